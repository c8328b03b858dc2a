"""Data stage: image files -> (HR patch, Real-ESRGAN LR) pairs in Parquet shards, on Ray Data.

    python -m jobs.prepare_data --input DIR|FILE|URI --output URI [--glob] [--patch-size 512]
        [--crops-per-image N] [--crop-mode random|grid] [--degradation realesrgan|bicubic]
        [--scale 4] [--seed 0] [--shard-rows N] [--max-pixels N] [--max-bytes N]
        [--captioner off|template|qwen2vl] [--overwrite] [--address ...] [--num-cpus ...]

Pipeline: list files (streamed into `_work/` Parquet chunks, cut into units of `files_per_task`
files) -> [read, digest, skip finished, decode, crop, degrade, template captions] (Ray tasks,
about four per cluster CPU, each working through a run of units and passing each unit's pairs
on as it goes) -> [write one shard per `shard_rows` rows] (a small pool of writer actors). Layout of `--output` (written through `pipeline.output`):

    _run.json                   run record: the settings that define the pairs; a rerun must match
    _lease.json                 held while a run writes; a second concurrent run refuses
    shards/part-<hash>.parquet  PAIR_SCHEMA rows (pipeline/schema.py), at most shard_rows each
    errors/part-<hash>.parquet  ERROR_SCHEMA rows: one per file that failed or is unsupported
    manifest.json               every committed shard with its row count, and totals

Identity: `sample_id` = hash of the file's bytes (sha256) and the crop's index, so the same
image reached through a moved, renamed or symlinked path has the same ids and is not redone;
crops and degradations are drawn from (seed, content digest, crop index), so each pair depends
only on the bytes, never on the path, worker count or batch size.

Resume: every part is committed atomically (dot-prefixed temp file, then rename); a killed run
leaves no partial shard. A rerun builds a hash-partitioned index of the finished sample_ids
(and errored source_uris) inside Ray Data from the committed parts; each task skips the crops
(and files) found there. Delete errors/ to retry failed files.

Inputs: a literal path (file or directory) is never read as a glob; `--glob` (or a path that
does not exist) makes it one. Directories are walked recursively, following directory
symlinks once per real directory. Only regular files are read (a FIFO or a device is an error
row); a file above `--max-bytes` or an image whose header says more than `--max-pixels` pixels
is an error row before it is decoded; a file without an image extension is an "unsupported"
row. Hidden files are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob as globlib
import hashlib
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common import (EXIT_OK, add_allow_errors_arg, add_ray_args, connect_first, exit_status, init_ray, is_local,
                         resolve_fs, run_job)
from pipeline import names
from pipeline import output as out
from pipeline import shards as pair_shards
from pipeline.degrade import DEGRADATION_KINDS, PARAMS_VERSION, degrade
from pipeline.done_index import EMPTY_INDEX, INDEX_DIR, DoneIndex, build_done_index
from pipeline.fingerprint import bytes_digest
from pipeline.images import ALPHA_MODES, ImageDecodeError, ImageTooLarge, load_image, to_rgb8
from pipeline.listing import ListingUnits, rows_of_runs, write_listing_chunks
from pipeline.schema import (CAPTION_COLUMNS, ERROR_SCHEMA, IMAGE_COLUMNS, PAIR_SCHEMA, content_sample_id, dataset_card,
                             encode_png)

CROP_MODES = ("random", "grid")
CAPTIONERS = ("off", "template", "qwen2vl")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".jfif")
SHARDS_DIR, ERRORS_DIR, WORK_DIR = pair_shards.SHARDS_DIR, "errors", "_work"
ERRORS_FILE, MANIFEST_FILE = ERRORS_DIR, "manifest.json"  # errors: a directory of parts
PART_PREFIX, TMP_PREFIX, PARQUET_SUFFIX = out.PART_PREFIX, out.TMP_PREFIX, out.PARQUET_SUFFIX
ROW_GROUP_ROWS = out.ROW_GROUP_ROWS  # pairs per Parquet row group: readers stream a shard in small steps
CROP_STREAM = 1  # keeps the crop generator's seed apart from the degradation's
GLOB_CHARS = "*?["
WORK_CHUNK_ROWS = 50_000  # listed files per `_work` chunk: the listing never sits whole in memory
DEFAULT_MAX_PIXELS = 40_000_000  # ~1.6 GB peak per task at the decode + composite
DEFAULT_MAX_BYTES = 256 << 20
# Fields of PrepareConfig that change the pairs: a rerun into the same output must keep them.
DATA_FIELDS = ("patch_size", "crops_per_image", "crop_mode", "scale", "seed", "alpha", "degradation",
               "captioner")
WORK_SCHEMA = pa.schema([("source_uri", pa.string()), ("reject", pa.string())])


@dataclass(frozen=True)
class PrepareConfig:
    """Everything the job needs; `main` only parses flags into one of these."""

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


# ---------------------------------------------------------------------------------------------
# Listing inputs
# ---------------------------------------------------------------------------------------------

def _has_extension(path: str, extensions: Sequence[str]) -> bool:
    return path.rsplit("/", 1)[-1].lower().endswith(tuple(extensions))


def _hidden(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(".")


def walk_files(root: str, exclude: Sequence[str] = ()) -> Iterator[str]:
    """Files under a local directory, recursively, sorted per directory; directory symlinks are
    followed, each real directory once (a link loop ends). Directories in `exclude` (e.g. the
    job's own output) are not entered."""
    seen = set()
    for path in exclude:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            seen.add((info.st_dev, info.st_ino))
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
            else:
                yield entry.path
        stack.extend(reversed(subdirs))


def _list_local(pattern: str, as_glob: bool, exclude: Sequence[str] = ()) -> Iterator[str]:
    path = os.path.abspath(os.path.expanduser(pattern))
    if not as_glob and os.path.lexists(path):
        if os.path.isdir(path):
            yield from walk_files(path, exclude)
        else:
            yield path
        return
    if not as_glob and not any(c in pattern for c in GLOB_CHARS):
        raise FileNotFoundError(f"input not found: {pattern!r}")
    matches = sorted(globlib.iglob(path, recursive=True))
    if not matches:
        raise FileNotFoundError(f"input not found: no path matches the glob {pattern!r}")
    for match in matches:  # a matching directory is walked
        if os.path.isdir(match):
            yield from walk_files(match, exclude)
        else:
            yield match


def _list_remote(uri: str, as_glob: bool = True, exclude: Sequence[str] = ()) -> List[str]:
    """The files under a URI (or matching a glob URI); those under the URIs in `exclude` (the
    output, when it lies inside the input) are left out."""
    scheme = uri.split("://", 1)[0]
    skip = [resolve_fs(e)[1].rstrip("/") + "/" for e in exclude if "://" in e and not is_local(e)]
    fs, root = resolve_fs(uri)
    info = fs.get_file_info(root)
    pattern_at = -1
    if info.type == pafs.FileType.NotFound and (as_glob or any(c in uri for c in GLOB_CHARS)):
        pattern_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
        if pattern_at >= 0:
            fs, root = resolve_fs(uri[:pattern_at].rsplit("/", 1)[0])
            info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        paths = [root]
    elif info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and not any(i.path.startswith(prefix) for prefix in skip))
    else:
        raise FileNotFoundError(f"input not found: {uri!r}")
    uris = [f"{scheme}://{p}" for p in paths]
    return uris if pattern_at < 0 else [u for u in uris if fnmatch.fnmatchcase(u, uri)]


def iter_listing(input_uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 as_glob: bool = False, exclude: Sequence[str] = ()
                 ) -> Iterator[Tuple[str, Optional[str]]]:
    """(uri, reject reason or None) for every non-hidden file of the input, in a stable order.

    A single file given literally is always a candidate; other files without an image extension
    come with the reason "unsupported: ...".
    """
    local = is_local(input_uri)
    pattern = input_uri[len("file://"):] if input_uri.startswith("file://") else input_uri
    files = _list_local(pattern, as_glob, exclude) if local else iter(_list_remote(input_uri, as_glob, exclude))
    first = next(files, None)
    if first is None:
        return
    second = next(files, None)
    if second is None and not as_glob and not any(c in input_uri for c in GLOB_CHARS):
        yield first, None  # one file asked for by name
        return
    for path in ([first, second] if second is not None else [first]):
        if not _hidden(path):
            yield path, None if _has_extension(path, extensions) else (
                f"unsupported: not an image file extension ({os.path.splitext(path)[1] or 'none'})")
    for path in files:
        if not _hidden(path):
            yield path, None if _has_extension(path, extensions) else (
                f"unsupported: not an image file extension ({os.path.splitext(path)[1] or 'none'})")


def list_sources(input_uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 as_glob: bool = False) -> List[str]:
    """Sorted image files of a local dir / file / glob, or of a pyarrow URI (s3://, gs://...).

    Local files are returned as absolute paths, remote ones as URIs. Unsupported files are left
    out here (the job records them as error rows).
    """
    return sorted(uri for uri, reject in iter_listing(input_uri, extensions, as_glob) if reject is None)


class InputTooLarge(OSError):
    """A file above the byte cap, or not a regular file."""


def read_bytes(uri: str, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of a regular file (local path or pyarrow URI), at most `max_bytes`.

    Raises InputTooLarge for special files (FIFO, device, socket) and files above the cap:
    neither is ever opened for reading. A local name that is not UTF-8 comes as the file:// URI
    of `pipeline.names.to_text`.
    """
    uri = names.from_text(uri)
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InputTooLarge(f"not a regular file ({_file_kind(info.st_mode)})")
        if max_bytes is not None and info.st_size > max_bytes:
            raise InputTooLarge(f"file too large: {info.st_size} bytes > max_bytes {max_bytes}")
        with open(path, "rb") as f:
            # a buffer of the file's size, not the cap's (a 256 MB read buffer costs 30 us a file)
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew since the stat: read on, up to the cap
                data += f.read(max_bytes + 1 - len(data) if max_bytes is not None else -1)
    else:
        fs, path = resolve_fs(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise InputTooLarge(f"not a regular file ({info.type.name})")
        if max_bytes is not None and info.size is not None and info.size > max_bytes:
            raise InputTooLarge(f"file too large: {info.size} bytes > max_bytes {max_bytes}")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1 if max_bytes is not None else None)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputTooLarge(f"file too large: more than max_bytes {max_bytes} bytes")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


# ---------------------------------------------------------------------------------------------
# Per-file stage (pure functions; no Ray)
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


def process_uri(source_uri: str, cfg: PrepareConfig, done: DoneIndex = EMPTY_INDEX
                ) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, str]]]:
    """`process_source` on a file read from its URI, skipping the crops `done` holds.

    Unreadable, special or oversized files give an error row; a file whose crops are all done
    is not decoded.
    """
    try:
        data = read_bytes(source_uri, cfg.max_bytes)
    except InputTooLarge as exc:
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
# Tables and parts
# ---------------------------------------------------------------------------------------------

PAIR_COLUMNS_BEFORE_CAPTIONS = tuple(n for n in PAIR_SCHEMA.names if n not in CAPTION_COLUMNS)
# as the pairs travel between stages: PNG bytes in the image columns (`pipeline.shards` stores them)
_STAGE_SCHEMA = pa.schema([pa.field(n, pa.binary()) if n in IMAGE_COLUMNS else PAIR_SCHEMA.field(n)
                           for n in PAIR_COLUMNS_BEFORE_CAPTIONS])


def pairs_table(rows: List[Dict[str, Any]]) -> pa.Table:
    """Rows of `make_pair` -> a table of PAIR_SCHEMA's columns without the caption columns."""
    return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA)


def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def write_shard(table: pa.Table, output: str) -> Optional[Dict[str, Any]]:
    """Commit one shard of pair rows under output/shards; its {"shard", "rows"} or None if empty."""
    return pair_shards.write_shard(table, output, PARAMS_VERSION)


def write_errors(rows: List[Dict[str, str]], output: str) -> None:
    """Commit error rows as one part of output/errors (named by their sources)."""
    if rows:
        fs, root = resolve_fs(output)
        name = out.content_part_name(r["source_uri"] for r in rows)
        out.write_parquet_atomic(fs, _join(root, ERRORS_DIR, name),
                                 pa.Table.from_pylist(rows, schema=ERROR_SCHEMA))


# ---------------------------------------------------------------------------------------------
# Ray Data adapters (thin: the work is in the functions above)
# ---------------------------------------------------------------------------------------------

def degrade_batch(batch: pa.Table, cfg: Dict[str, Any], shards_done: DoneIndex = EMPTY_INDEX,
                  errors_done: DoneIndex = EMPTY_INDEX) -> pa.Table:
    """Batch of listed files {source_uri, reject} -> pair rows; its bad files go to output/errors.

    Files with an error row already (`errors_done`) and crops already in a shard
    (`shards_done`) are skipped.
    """
    cv2.setNumThreads(1)  # a Ray task holds one CPU; OpenCV would otherwise start a thread per core
    config = PrepareConfig(**cfg)
    items = batch.to_pylist()
    recorded = errors_done.done([item["source_uri"] for item in items])
    pairs, errors = [], []
    for item, has_error in zip(items, recorded):
        if has_error:
            continue
        if item.get("reject"):
            errors.append(error_row(item["source_uri"], "unsupported", item["reject"]))
            continue
        rows, error = process_uri(item["source_uri"], config, shards_done)
        pairs.extend(rows)
        if error is not None:
            errors.append(error)
    write_errors(errors, config.output)
    return pairs_table(pairs)


def add_captions(ds, captioner: str):
    """The caption stage of `pipeline.caption` (qwen2vl: its GPU actor pool)."""
    from pipeline.caption import CaptionConfig, add_caption_stage

    return add_caption_stage(ds, CaptionConfig(backend=captioner))


def degrade_units(batch: pa.Table, listing: ListingUnits, runs: int, cfg: Dict[str, Any],
                  shards_done: DoneIndex = EMPTY_INDEX,
                  errors_done: DoneIndex = EMPTY_INDEX) -> Iterator[pa.Table]:
    """Batch of run numbers {id} -> the pairs of each unit of those runs (`degrade_batch` on the
    unit's files), unit by unit.

    With a CPU captioner (template) or none, the task captions and writes them itself: it yields
    the SHARD_SCHEMA row of each shard of `shard_rows` pairs as it commits it. With qwen2vl it
    yields the pair rows, for the captioner's actor pool and the writer stage after it.
    """
    config = PrepareConfig(**cfg)
    tables = (degrade_batch(files, cfg, shards_done, errors_done)
              for files in rows_of_runs(batch, listing, runs))
    if config.captioner == "qwen2vl":
        yield from tables
        return
    if config.captioner != "off":
        from pipeline.caption import CaptionConfig, caption_table

        captions = CaptionConfig(backend=config.captioner)
        tables = (caption_table(table, captions) for table in tables)
    yield from pair_shards.write_shards(tables, config.output, PARAMS_VERSION, config.shard_rows)


def degrade_runs(listing: ListingUnits, cfg: PrepareConfig, cluster_cpus: float) -> int:
    """Degrade tasks (runs of units): `listing.runs`, but when the job writes its shards in the
    degrade tasks no more than it takes to fill shards of `shard_rows` pairs (a task's last shard
    is short), while keeping one task per CPU (or per `num_workers`)."""
    runs = listing.runs(cluster_cpus)
    if cfg.captioner == "qwen2vl":
        return runs
    pairs = sum(listing.rows) * cfg.crops_per_image  # at most; done and failed files make fewer
    slots = cfg.num_workers or max(1, int(cluster_cpus))
    return min(runs, max(slots, -(-pairs // cfg.shard_rows)))


def build_dataset(listing: ListingUnits, cfg: PrepareConfig, shards_done: DoneIndex = EMPTY_INDEX,
                  errors_done: DoneIndex = EMPTY_INDEX):
    """The listing, `files_per_task` files a unit -> a Ray Dataset of written shards ({shard, rows}).

    Without a GPU captioner it is a single operator: a run of units per task (no batch size, so
    the read of the run numbers fuses with it), each task degrading, captioning and writing its
    pairs as it goes. No writer actor: an actor pool's start (its worker process, and Ray Data's
    actor-location tracker, which holds up the first tasks) cost ~1 s of a 3 s small job.
    """
    import ray

    compute = ray.data.TaskPoolStrategy(size=cfg.num_workers) if cfg.num_workers else None
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    runs = degrade_runs(listing, cfg, cluster_cpus)
    ds = listing.dataset(runs).map_batches(
        degrade_units, fn_kwargs={"listing": listing, "runs": runs, "cfg": asdict(cfg),
                                  "shards_done": shards_done, "errors_done": errors_done},
        batch_size=None, batch_format="pyarrow", compute=compute)
    if cfg.captioner == "qwen2vl":
        ds = add_captions(ds, cfg.captioner)
        return pair_shards.add_shard_writer(ds, cfg.output, PARAMS_VERSION, cfg.shard_rows, cluster_cpus)
    # One operator, whose output is a row per shard: Ray Data's per-operator reservation (there
    # to share CPUs and object store among operators) only held it to one task at a time until
    # its first task had finished (measured: a CPU idle for the first second on 2 CPUs).
    ds.context.op_resource_reservation_enabled = False  # this dataset's own context
    return ds


# ---------------------------------------------------------------------------------------------
# Output state
# ---------------------------------------------------------------------------------------------

def write_work_listing(cfg: PrepareConfig, output: out.Output) -> ListingUnits:
    """Stream the input listing into `_work/listing-NNNNN.parquet` chunks (WORK_SCHEMA), cut into
    units of `files_per_task` files; the listing is never held whole."""
    directory = output.path(WORK_DIR)
    output.fs.delete_dir_contents(directory, missing_dir_ok=True)
    exclude = [output.root if is_local(cfg.output) else output.uri]  # when it lies inside the input
    rows = ({"source_uri": names.to_text(uri), "reject": reject}  # a name that is not UTF-8: a file:// URI
            for uri, reject in iter_listing(cfg.input, cfg.extensions, cfg.glob, exclude))
    chunks, counts = write_listing_chunks(output.fs, directory, rows, WORK_SCHEMA, WORK_CHUNK_ROWS)
    return ListingUnits(output.fs, chunks, counts, cfg.files_per_task)


def count_rows(fs: pafs.FileSystem, root: str, directory: str) -> Tuple[List[str], int]:
    parts = out.list_parts(fs, _join(root, directory))
    return parts, sum(out.part_rows(fs, parts))


def count_failed(fs: pafs.FileSystem, root: str) -> int:
    """Error rows of files that failed (every stage but `unsupported`: a file that is not an
    image by its extension is not a failure), read a part's `stage` column at a time."""
    failed = 0
    for path in out.list_parts(fs, _join(root, ERRORS_DIR)):
        with fs.open_input_file(path) as f:
            stages = pq.read_table(f, columns=["stage"]).column("stage")
        failed += len(stages) - stages.to_pylist().count("unsupported")
    return failed


def write_manifest(fs: pafs.FileSystem, root: str, cfg: PrepareConfig) -> Dict[str, Any]:
    """manifest.json: every committed shard (path relative to the output) and its row count."""
    shards = out.list_parts(fs, _join(root, SHARDS_DIR))
    rows = out.part_rows(fs, shards)
    _, n_errors = count_rows(fs, root, ERRORS_DIR)
    manifest = {"format": "flowsr-pairs", "schema": PAIR_SCHEMA.names,
                "settings": cfg.data_settings(),
                "shards": [{"path": f"{SHARDS_DIR}/{p.rsplit('/', 1)[-1]}", "rows": n}
                           for p, n in zip(shards, rows)],
                "total_rows": sum(rows),
                "errors": {"path": ERRORS_DIR, "rows": n_errors, "failed": count_failed(fs, root)}}
    out.write_json_atomic(fs, _join(root, MANIFEST_FILE), manifest)
    card = dataset_card(f"{SHARDS_DIR}/*.parquet", scale=cfg.scale, params_version=PARAMS_VERSION)
    out.write_bytes_atomic(fs, _join(root, "README.md"), card.encode())
    return manifest


def read_errors(output: str) -> pa.Table:
    """All error rows of an output (ERROR_SCHEMA)."""
    fs, root = resolve_fs(output)
    tables = []
    for path in out.list_parts(fs, _join(root, ERRORS_DIR)):
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f).cast(ERROR_SCHEMA))
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig, *, on_shard: Optional[Callable[[Dict[str, Any]], None]] = None
            ) -> Dict[str, Any]:
    """Run the data stage; returns a summary dict. `on_shard` sees each shard as it is written.

    Raises OutputBusy when another run holds the output, RunMismatch when it holds pairs made
    with other settings (both one-line `pipeline.output.OutputError`s).
    """
    start = time.perf_counter()
    connected = connect_first(cfg.address)  # a cluster that does not answer: one line, the output untouched
    try:
        with out.open_output(cfg.output, cfg.record(), overwrite=cfg.overwrite) as output:
            fs, root = output.fs, output.root
            out.remove_file(output.uri_of(MANIFEST_FILE))  # written again only when this run finishes
            listing = write_work_listing(cfg, output)
            listed = sum(listing.rows)
            shard_parts, pairs_before = count_rows(fs, root, SHARDS_DIR)
            error_parts, errors_before = count_rows(fs, root, ERRORS_DIR)
            pairs = shards = 0
            if listing.count:
                started = init_ray(cfg.address, num_cpus=cfg.num_cpus)
                try:
                    shards_done = build_done_index(output, shard_parts, "sample_id", SHARDS_DIR)
                    errors_done = build_done_index(output, error_parts, "source_uri", ERRORS_DIR)
                    for row in build_dataset(listing, cfg, shards_done, errors_done).iter_rows():
                        pairs, shards = pairs + row["rows"], shards + 1
                        if on_shard is not None:
                            on_shard(row)
                finally:
                    if started:
                        import ray

                        ray.shutdown()
            manifest = write_manifest(fs, root, cfg)
            out.remove_dir(fs, output.path(WORK_DIR))
            out.remove_dir(fs, output.path(INDEX_DIR))
    finally:
        if connected:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - start
    n_errors = manifest["errors"]["rows"]
    summary = {"output": cfg.output, "sources": listed, "resumed": output.resumed,
               "pairs_written": pairs, "shards_written": shards,
               "errors_new": n_errors - errors_before, "total_pairs": manifest["total_rows"],
               "total_shards": len(manifest["shards"]), "total_errors": n_errors,
               "failed": manifest["errors"]["failed"],
               "seconds": round(seconds, 3), "pairs_per_s": round(pairs / max(seconds, 1e-9), 2)}
    print(f"prepare_data: wrote {pairs} pairs in {shards} shards ({summary['pairs_per_s']} pairs/s, "
          f"{seconds:.1f} s); {summary['errors_new']} new error rows; {listed} files listed; "
          f"output holds {summary['total_pairs']} pairs in {summary['total_shards']} shards, "
          f"{n_errors} error rows -> {cfg.output}", flush=True)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[PrepareConfig, bool, bool]:
    defaults = PrepareConfig(input="-", output="-")
    p = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="local dir or file, or a pyarrow URI (s3://...)")
    p.add_argument("--output", required=True, help="output dir or URI (s3://, gs://, ...)")
    p.add_argument("--glob", action="store_true",
                   help="read --input as a glob pattern (a path that exists is otherwise literal)")
    p.add_argument("--patch-size", type=int, default=defaults.patch_size,
                   help="HR crop size, pixels")
    p.add_argument("--crops-per-image", type=int, default=defaults.crops_per_image,
                   help="HR crops taken from each source image")
    p.add_argument("--crop-mode", choices=CROP_MODES, default=defaults.crop_mode,
                   help="where crops are taken: random (seeded by content) or a grid")
    p.add_argument("--degradation", choices=DEGRADATION_KINDS, default=defaults.degradation,
                   help="realesrgan (second-order, the paper) or bicubic x4")
    p.add_argument("--scale", type=int, default=defaults.scale,
                   help="SR factor: LR side = patch size / scale")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="global seed; each pair draws from (seed, sample_id)")
    p.add_argument("--shard-rows", type=int, default=defaults.shard_rows,
                   help="pairs per Parquet shard")
    p.add_argument("--captioner", choices=CAPTIONERS, default=defaults.captioner,
                   help="caption columns: off, template (from the degradation), qwen2vl (use jobs.caption for a VLM at scale)")
    p.add_argument("--files-per-task", type=int, default=defaults.files_per_task,
                   help="source files per unit of work; a degrade task works through a run of units "
                        "(about four tasks per cluster CPU)")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers,
                   help="at most this many degrade tasks at once (default: as many as CPUs)")
    p.add_argument("--alpha", choices=ALPHA_MODES, default=defaults.alpha,
                   help="what to do with an alpha channel before cropping")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="larger images (by their header) are error rows, never decoded")
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                   help="larger files are error rows, never read")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the output's earlier results instead of resuming them")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--dry-run", action="store_true", help="print the config and inputs, write nothing")
    add_allow_errors_arg(p)
    add_ray_args(p)
    args = vars(p.parse_args(argv))
    dry_run, allow_errors = args.pop("dry_run"), args.pop("allow_errors")
    try:
        return PrepareConfig(**args), dry_run, allow_errors
    except ValueError as exc:
        p.error(str(exc))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; returns the exit status (`jobs.common.exit_status`): 1 when the output holds
    error rows of files that failed (`--allow-errors`: 0). A user mistake (busy or mismatched
    output, missing input) is one line on stderr and exit status 2."""
    cfg, dry_run, allow_errors = parse_args(argv)
    try:
        if dry_run:
            sources = list_sources(cfg.input, cfg.extensions, cfg.glob)
            print(json.dumps({**asdict(cfg), "sources": len(sources)}, indent=2))
            return EXIT_OK
        summary = prepare(cfg)
    except (out.OutputError, FileNotFoundError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return exit_status(summary["failed"], allow_errors)


if __name__ == "__main__":
    sys.exit(run_job("prepare-data", main))
