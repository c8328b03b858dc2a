"""The one definition of the training-pair Parquet schema (docs/DESIGN.md, "Data contract").

Writers (`jobs.prepare_data`, `jobs.caption`) and readers (`jobs.train`, `jobs.evaluate`) import
from here. Images are stored as encoded PNG bytes (uint8 RGB), never as array columns.
Captions live in their own columns so that regenerating them is a join on `sample_id`.

`hr` / `lr` are stored as Hugging Face `datasets`' image storage, a struct {bytes: the PNG,
path: null} (IMAGE_STORAGE), and each pair shard's Parquet schema carries `datasets`' own
`huggingface` feature metadata besides the `flowsr` one (`with_shard_metadata`: schema version,
scale, degradation-parameters version). So `datasets.load_dataset("parquet", data_files=...)`
on shards alone, like `datasets.load_dataset(OUT)` on a `prepare-data` output folder (its
`README.md` dataset card, `dataset_card`), reads `hr` / `lr` as `Image` features with no other
argument (`datasets` takes a Parquet file's feature metadata only for a column stored as that
struct). pandas and pyarrow read the struct; `image_bytes` / `decode_png` take a value of either
layout, so shards of schema version 1 (plain bytes) still read.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Optional

import numpy as np
import pyarrow as pa

# `datasets.Image`'s Arrow storage (nullable, as `datasets` declares it, or it ignores the metadata)
IMAGE_STORAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

PAIR_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),  # content_sample_id: bytes digest + crop index
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("crop", pa.string()),  # JSON {"y", "x", "size"} in source pixels
    pa.field("hr", IMAGE_STORAGE),  # {bytes: PNG, uint8 RGB, patch x patch; path: null}
    pa.field("lr", IMAGE_STORAGE),  # {bytes: PNG, uint8 RGB, (patch/scale)^2; path: null}
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

SCHEMA_VERSION = 2  # bump on any change of PAIR_SCHEMA's columns or their meaning (2: hr / lr as IMAGE_STORAGE)
IMAGE_COLUMNS = ("hr", "lr")
FLOWSR_METADATA_KEY = b"flowsr"
HF_METADATA_KEY = b"huggingface"  # datasets.Features.arrow_schema's key
_HF_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.binary(): "binary"}

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


def image_bytes(value) -> bytes:
    """The encoded image of an `hr` / `lr` value: an IMAGE_STORAGE struct ({"bytes", "path"}, as
    pyarrow and Ray Data give it) or plain bytes (schema version 1)."""
    return value["bytes"] if isinstance(value, dict) else value


def image_storage(column) -> pa.Array:
    """An `hr` / `lr` column (or array) of PNG bytes as IMAGE_STORAGE (path null); one already
    in that layout is returned as it is."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type == IMAGE_STORAGE:
        return column
    column = column.cast(pa.binary())
    return pa.StructArray.from_arrays([column, pa.nulls(len(column), pa.string())], fields=list(IMAGE_STORAGE),
                                      mask=column.is_null())


def decode_png(data) -> np.ndarray:
    """PNG bytes (or an IMAGE_STORAGE value, `image_bytes`) -> uint8 HxWx3 (RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes(data))) as im:
        return np.asarray(im.convert("RGB"))


def hf_feature_dict(schema: pa.Schema = PAIR_SCHEMA) -> dict:
    """`datasets.Features.to_dict()` of `schema`: image columns as `Image`, the rest as `Value`."""
    return {f.name: {"_type": "Image"} if f.name in IMAGE_COLUMNS else {"dtype": _HF_DTYPES[f.type], "_type": "Value"}
            for f in schema}


def hf_features(schema: pa.Schema = PAIR_SCHEMA):
    """`datasets.Features` of the pair shards (`hr` / `lr` decode to PIL images); needs `datasets`."""
    import datasets

    return datasets.Features.from_dict(hf_feature_dict(schema))


def dataset_card(shards_glob: str, *, scale: Optional[int] = None, params_version: Optional[int] = None) -> str:
    """README.md of a pair-dataset folder: `datasets.load_dataset(folder)` reads `shards_glob`
    (relative to the folder) with `hr` / `lr` as images."""
    features = "".join(f"  - name: {f.name}\n    dtype: {'image' if f.name in IMAGE_COLUMNS else _HF_DTYPES[f.type]}\n"
                       for f in PAIR_SCHEMA)
    return (f"---\ndataset_info:\n  features:\n{features}configs:\n- config_name: default\n  data_files:\n"
            f"  - split: train\n    path: {shards_glob}\ntask_categories:\n- image-to-image\ntags:\n"
            f"- super-resolution\n- flowsr\n---\n\n# FlowSR training pairs\n\n"
            f"HR / LR pairs (x{scale if scale else '?'}, degradation parameters version {params_version}, "
            f"schema version {SCHEMA_VERSION}) written by `flowsr prepare-data`. `hr` and `lr` are PNG "
            f"bytes; every drawn degradation parameter is in `degradation` (JSON).\n\n"
            f"```python\nimport datasets\nds = datasets.load_dataset(\"path/to/this/folder\", split=\"train\")"
            f"  # hr / lr as PIL images\n```\n")


def with_shard_metadata(table: pa.Table, *, params_version: Optional[int] = None) -> pa.Table:
    """`table` (PAIR_SCHEMA columns) with the `flowsr` schema metadata; `scale` is the table's
    one scale (None when it holds several)."""
    scales = set(table.column("scale").to_pylist()) if "scale" in table.column_names else set()
    flowsr = {"schema_version": SCHEMA_VERSION, "scale": scales.pop() if len(scales) == 1 else None,
              "degradation_params_version": params_version}
    hf = {"info": {"features": hf_feature_dict(table.schema)}}
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          FLOWSR_METADATA_KEY: json.dumps(flowsr).encode(),
                                          HF_METADATA_KEY: json.dumps(hf).encode()})


def shard_metadata(schema: pa.Schema) -> dict:
    """The `flowsr` metadata of a shard's schema ({} for shards written before it existed)."""
    raw = (schema.metadata or {}).get(FLOWSR_METADATA_KEY)
    return json.loads(raw) if raw else {}


def content_sample_id(digest: str, crop_index: int) -> str:
    """Stable id of crop `crop_index` of a source whose bytes hash to `digest` (hex): the first
    16 hex digits of sha1(digest|index). Moved, renamed or symlinked copies of a file share it."""
    return hashlib.sha1(f"{digest}|{crop_index}".encode()).hexdigest()[:16]
