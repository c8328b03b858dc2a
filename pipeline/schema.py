"""The one definition of the training-pair Parquet schema (DESIGN.md, "Data contract").

Writers (`jobs.prepare_data`, `jobs.caption`) and readers (`jobs.train`, `jobs.evaluate`) import
from here. Images are stored as encoded PNG bytes (uint8 RGB), never as array columns.
Captions live in their own columns so that regenerating them is a join on `sample_id`.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa

PAIR_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),  # content_sample_id: bytes digest + crop index
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("crop", pa.string()),  # JSON {"y", "x", "size"} in source pixels
    pa.field("hr", pa.binary(), nullable=False),  # PNG, uint8 RGB, patch x patch
    pa.field("lr", pa.binary(), nullable=False),  # PNG, uint8 RGB, (patch/scale)^2
    pa.field("hr_size", pa.int32()),
    pa.field("scale", pa.int32(), nullable=False),
    pa.field("degradation", pa.string()),  # JSON of every drawn parameter
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("conversion", pa.string()),  # how the source was converted (mode, bit depth, ...), or ""
    pa.field("hr_caption", pa.string()),
    pa.field("lr_caption", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("caption_prompt_version", pa.string()),
])

CAPTION_COLUMNS = ("hr_caption", "lr_caption", "caption_model", "caption_prompt_version")

CAPTION_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    *[PAIR_SCHEMA.field(name) for name in CAPTION_COLUMNS],
])

ERROR_SCHEMA = pa.schema([
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
])


def make_sample_id(source_uri: str, crop_y: int, crop_x: int, size: int) -> str:
    """Stable id of one crop of one source: first 16 hex digits of sha1(uri|y|x|size)."""
    key = f"{source_uri}|{crop_y}|{crop_x}|{size}".encode()
    return hashlib.sha1(key).hexdigest()[:16]


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxWx3 (RGB) -> PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 HxWx3 (RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def content_sample_id(digest: str, crop_index: int) -> str:
    """Stable id of crop `crop_index` of a source whose bytes hash to `digest` (hex): the first
    16 hex digits of sha1(digest|index). Moved, renamed or symlinked copies of a file share it."""
    return hashlib.sha1(f"{digest}|{crop_index}".encode()).hexdigest()[:16]
