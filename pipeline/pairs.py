"""Pair building: the data stage's settings (`PrepareConfig`) and one source image's bytes ->
(HR patch, degraded LR) pair rows. No Ray and no I/O but the injected file read
(`SourceReader`), so every function here runs on one image in a test.

Identity: `sample_id` = hash of the file's bytes (sha256) and the crop's index, so the same
image reached through a moved, renamed or symlinked path has the same ids and is not redone;
crops and degradations are drawn from (seed, content digest, crop index), so each pair depends
only on the bytes, never on the path, worker count or batch size.

A failure is an ERROR_SCHEMA row ({source_uri, stage, error}), never an exception: `stage` is
read, limit (over --max-pixels by its header), decode, crop (smaller than a patch) or degrade.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

import numpy as np
import pyarrow as pa

from pipeline import output as out
from pipeline.done_index import DoneIndex, EMPTY_INDEX
from pipeline.fingerprint import bytes_digest
from pipeline.caption import BACKENDS
from pipeline.degrade import DEGRADATION_KINDS, PARAMS_VERSION, degrade
from pipeline.images import ALPHA_MODES, ImageDecodeError, ImageTooLarge, load_image, to_rgb8
from pipeline.schema import CAPTION_COLUMNS, IMAGE_COLUMNS, PAIR_SCHEMA, content_sample_id, encode_png
from pipeline.inputs import IMAGE_EXTENSIONS

CROP_MODES = ("random", "grid")
CAPTIONERS = BACKENDS  # --captioner: pipeline.caption's backends
CROP_STREAM = 1  # keeps the crop generator's seed apart from the degradation's
DEFAULT_MAX_PIXELS = 40_000_000  # ~1.6 GB peak per task at the decode + composite
DEFAULT_MAX_BYTES = 256 << 20
# Fields of PrepareConfig that change the pairs: a rerun into the same output must keep them.
DATA_FIELDS = ("patch_size", "crops_per_image", "crop_mode", "scale", "seed", "alpha", "degradation",
               "captioner")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything the data stage needs (`jobs.prepare_data` parses its flags into one)."""

    input: str
    output: str
    patch_size: int = 512
    crops_per_image: int = 1  # random: exactly N crops; grid: the first N tiles in raster order
    crop_mode: str = "random"
    degradation: str = "realesrgan"  # realesrgan (the paper's data) | bicubic (classical x1/scale)
    scale: int = 4
    seed: int = 0
    shard_rows: int = 500
    captioner: str = "off"
    files_per_task: int = 4  # source files per unit of work (a task works through a run of units)
    num_workers: Optional[int] = None  # concurrent decode/degrade tasks; None: as many as CPUs
    alpha: str = "white"  # transparent pixels: composited on "white", or the alpha "drop"ped
    extensions: Tuple[str, ...] = IMAGE_EXTENSIONS
    glob: bool = False  # read `input` as a glob pattern even when such a path exists
    max_pixels: int = DEFAULT_MAX_PIXELS  # header check before decode
    max_bytes: int = DEFAULT_MAX_BYTES
    overwrite: bool = False  # delete the output's earlier results instead of resuming
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # CPUs of a local Ray started by the job

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop mode: {self.crop_mode!r} (choose from {CROP_MODES})")
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"unknown captioner: {self.captioner!r} (choose from {CAPTIONERS})")
        if self.degradation not in DEGRADATION_KINDS:
            raise ValueError(f"unknown degradation: {self.degradation!r} (choose from {DEGRADATION_KINDS})")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"unknown alpha mode: {self.alpha!r} (choose from {ALPHA_MODES})")
        for name in ("patch_size", "crops_per_image", "scale", "shard_rows", "files_per_task",
                     "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size % self.scale:
            raise ValueError(f"patch_size {self.patch_size} is not divisible by scale {self.scale}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not self.input or not self.output:
            raise ValueError("input and output must be given")

    def data_settings(self) -> Dict[str, Any]:
        """The settings that define the pairs (the run record's params)."""
        return {**{name: getattr(self, name) for name in DATA_FIELDS},
                "degradation_params_version": PARAMS_VERSION}

    def record(self) -> Dict[str, Any]:
        return out.run_record("prepare_data", self.input, self.data_settings())


@dataclass(frozen=True)
class SourceReader:
    """How `process_uri` reads a listed file: `read(uri, max_bytes) -> bytes` raises `refused`
    (an OSError: a special file, a file above the cap; its message is the error row's) or
    another OSError / MemoryError (recorded with its type)."""

    read: Callable[[str, Optional[int]], bytes]
    refused: Type[OSError]


# ---------------------------------------------------------------------------------------------
# Per-file stage
# ---------------------------------------------------------------------------------------------

def plan_crops(height: int, width: int, key: str, *, patch_size: int, count: int,
               mode: str, seed: int) -> List[Tuple[int, int]]:
    """Top-left corners (y, x) of up to `count` patch_size crops of a height x width image.

    random: crop i is drawn from a generator seeded by (seed, key, i), `key` being the
    source's content digest (hex); repeated corners (possible on small images) are kept once.
    grid: non-overlapping tiles in raster order. Returns [] when the image is smaller than one
    patch. A crop's index in the returned list is part of its sample_id and does not change
    when more crops are asked for.
    """
    if height < patch_size or width < patch_size:
        return []
    if mode == "grid":
        tiles = [(y, x) for y in range(0, height - patch_size + 1, patch_size)
                 for x in range(0, width - patch_size + 1, patch_size)]
        return tiles[:count]
    if mode != "random":
        raise ValueError(f"unknown crop mode: {mode!r}")
    stream = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    corners: List[Tuple[int, int]] = []
    for index in range(count):
        rng = np.random.default_rng([seed, CROP_STREAM, stream, index])
        corner = (int(rng.integers(height - patch_size + 1)), int(rng.integers(width - patch_size + 1)))
        if corner not in corners:
            corners.append(corner)
    return corners


def error_row(source_uri: str, stage: str, error: str) -> Dict[str, str]:
    """One ERROR_SCHEMA row."""
    return {"source_uri": source_uri, "stage": stage, "error": error}


def make_pair(hr: np.ndarray, source_uri: str, y: int, x: int, *, sample_id: str, scale: int,
              seed: int, conversion: str, degradation: str = "realesrgan") -> Dict[str, Any]:
    """One PAIR_SCHEMA row (caption columns left out) from an HR patch, uint8 PxPx3 RGB."""
    size = hr.shape[0]
    lr, params = degrade(hr, seed=seed, sample_id=sample_id, scale=scale, kind=degradation)
    return {"sample_id": sample_id, "source_uri": source_uri,
            "crop": json.dumps({"y": y, "x": x, "size": size}), "hr": encode_png(hr),
            "lr": encode_png(lr), "hr_size": size, "scale": scale,
            "degradation": json.dumps(params, sort_keys=True), "seed": seed,
            "conversion": conversion}


def candidate_ids(digest: str, cfg: PrepareConfig) -> List[str]:
    """sample_ids of crops 0..crops_per_image-1 of the content `digest` (some may not exist)."""
    return [content_sample_id(digest, i) for i in range(cfg.crops_per_image)]


def process_source(source_uri: str, data: bytes, cfg: PrepareConfig, skip_ids: Iterable[str] = (),
                   digest: Optional[str] = None
                   ) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, str]]]:
    """Decode one file, crop and degrade it: (pair rows, None) or ([], error row).

    Crops whose sample_id is in `skip_ids` are not produced (they are already written).
    The pixel count is checked from the header before anything is decoded.
    """
    digest = digest or bytes_digest(data)
    try:
        rgb, conversion = to_rgb8(load_image(data, source_uri, cfg.max_pixels), alpha=cfg.alpha)
    except ImageTooLarge as exc:
        return [], error_row(source_uri, "limit", str(exc))
    except (ImageDecodeError, ValueError) as exc:
        return [], error_row(source_uri, "decode", str(exc))
    height, width = rgb.shape[:2]
    corners = plan_crops(height, width, digest, patch_size=cfg.patch_size,
                         count=cfg.crops_per_image, mode=cfg.crop_mode, seed=cfg.seed)
    if not corners:
        return [], error_row(source_uri, "crop", f"too small: {width}x{height} < patch "
                                                 f"{cfg.patch_size}x{cfg.patch_size}")
    skip, size = set(skip_ids), cfg.patch_size
    rows = []
    for index, (y, x) in enumerate(corners):
        sample_id = content_sample_id(digest, index)
        if sample_id in skip:
            continue
        hr = np.ascontiguousarray(rgb[y:y + size, x:x + size])
        rows.append(make_pair(hr, source_uri, y, x, sample_id=sample_id, scale=cfg.scale,
                              seed=cfg.seed, conversion=conversion, degradation=cfg.degradation))
    return rows, None


def process_uri(source_uri: str, cfg: PrepareConfig, reader: SourceReader,
                done: DoneIndex = EMPTY_INDEX) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, str]]]:
    """`process_source` on a file read from its URI by `reader`, skipping the crops `done` holds.

    Unreadable, special or oversized files give an error row; a file whose crops are all done
    is not decoded.
    """
    try:
        data = reader.read(source_uri, cfg.max_bytes)
    except reader.refused as exc:
        return [], error_row(source_uri, "read", str(exc))
    except (OSError, MemoryError) as exc:
        return [], error_row(source_uri, "read", f"{type(exc).__name__}: {exc}")
    digest = bytes_digest(data)
    ids = candidate_ids(digest, cfg)
    finished = done.done(ids)
    if finished.all():
        return [], None
    try:
        return process_source(source_uri, data, cfg, [i for i, f in zip(ids, finished) if f], digest)
    except Exception as exc:  # one bad file must not stop the job; the reason is recorded
        return [], error_row(source_uri, "degrade", f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Pair tables
# ---------------------------------------------------------------------------------------------

PAIR_COLUMNS_BEFORE_CAPTIONS = tuple(n for n in PAIR_SCHEMA.names if n not in CAPTION_COLUMNS)
# as the pairs travel between stages: PNG bytes in the image columns (`pipeline.shards` stores them)
_STAGE_SCHEMA = pa.schema([pa.field(n, pa.binary()) if n in IMAGE_COLUMNS else PAIR_SCHEMA.field(n)
                           for n in PAIR_COLUMNS_BEFORE_CAPTIONS])


def pairs_table(rows: List[Dict[str, Any]]) -> pa.Table:
    """Rows of `make_pair` -> a table of PAIR_SCHEMA's columns without the caption columns."""
    return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA)
