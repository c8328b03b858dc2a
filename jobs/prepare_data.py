"""Data stage: image files -> (HR patch, Real-ESRGAN LR) pairs in Parquet shards, on Ray Data.

    python -m jobs.prepare_data --input DIR|GLOB|URI --output URI [--patch-size 512]
        [--crops-per-image N] [--crop-mode random|grid] [--degradation realesrgan|bicubic]
        [--scale 4] [--seed 0] [--shard-rows N]
        [--captioner off|template|qwen2vl] [--address ...] [--num-cpus ...]

Pipeline: list files -> [read, decode, crop, degrade] (Ray tasks, `files_per_task` files each)
-> [captions] -> [write one shard per `shard_rows` rows]. Layout of `--output`:

    run_config.json             the settings that define the pairs; a rerun must match them
    shards/part-<hash>.parquet  PAIR_SCHEMA rows (pipeline/schema.py), at most shard_rows each
    errors/part-<hash>.parquet  ERROR_SCHEMA rows of the files that failed, during a run
    errors.parquet              all ERROR_SCHEMA rows, one per bad file (written at the end)
    manifest.json               every finished shard with its row count, and totals

Every file is written under a hidden temporary name (`.tmp-...`, skipped by pyarrow and Ray
readers) and renamed when complete, so a killed run leaves no partial shard. A rerun reads the
`sample_id`s of the finished shards and skips them, so each sample_id is written once; files
already in the errors table are skipped too (delete errors.parquet to retry them). One run per
output at a time: a run deletes the temporary files it finds there. Each pair depends only on (seed, source_uri, crop): the output
is the same for any worker count or batch size.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common import add_ray_args, init_ray, is_local, resolve_fs
from pipeline.degrade import DEGRADATION_KINDS, PARAMS_VERSION, degrade
from pipeline.images import ALPHA_MODES, ImageDecodeError, load_image, to_rgb8
from pipeline.schema import CAPTION_COLUMNS, ERROR_SCHEMA, PAIR_SCHEMA, encode_png, make_sample_id

CROP_MODES = ("random", "grid")
CAPTIONERS = ("off", "template", "qwen2vl")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".jfif")
SHARDS_DIR, ERRORS_DIR = "shards", "errors"
ERRORS_FILE, MANIFEST_FILE, RUN_CONFIG_FILE = "errors.parquet", "manifest.json", "run_config.json"
PART_PREFIX, TMP_PREFIX, PARQUET_SUFFIX = "part-", ".tmp-", ".parquet"
ROW_GROUP_ROWS = 64  # pairs per Parquet row group: readers stream a shard in small steps
CROP_STREAM = 1  # keeps the crop generator's seed apart from the degradation's
GLOB_CHARS = "*?["
# Fields of PrepareConfig that change the pairs: a rerun into the same output must keep them.
DATA_FIELDS = ("patch_size", "crops_per_image", "crop_mode", "scale", "seed", "alpha", "degradation")


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
    files_per_task: int = 4  # source files per decode/degrade task
    num_workers: Optional[int] = None  # concurrent decode/degrade tasks; None: as many as CPUs
    alpha: str = "white"  # transparent pixels: composited on "white", or the alpha "drop"ped
    extensions: Tuple[str, ...] = IMAGE_EXTENSIONS
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
        for name in ("patch_size", "crops_per_image", "scale", "shard_rows", "files_per_task"):
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
        """The settings that define the pairs (recorded in run_config.json)."""
        return {**{name: getattr(self, name) for name in DATA_FIELDS},
                "degradation_params_version": PARAMS_VERSION}


# ---------------------------------------------------------------------------------------------
# Listing inputs
# ---------------------------------------------------------------------------------------------

def _has_extension(path: str, extensions: Sequence[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def _list_local(pattern: str) -> List[str]:
    path = os.path.abspath(os.path.expanduser(pattern))
    if any(c in pattern for c in GLOB_CHARS):
        return [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    raise FileNotFoundError(f"input not found: {pattern!r}")


def _list_remote(uri: str) -> List[str]:
    scheme = uri.split("://", 1)[0]
    pattern_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
    base = uri if pattern_at < 0 else uri[:pattern_at].rsplit("/", 1)[0]
    fs, root = pafs.FileSystem.from_uri(base)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        paths = [root]
    elif info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File]
    else:
        raise FileNotFoundError(f"input not found: {uri!r}")
    uris = [f"{scheme}://{p}" for p in paths]
    return uris if pattern_at < 0 else [u for u in uris if fnmatch.fnmatchcase(u, uri)]


def list_sources(input_uri: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Sorted image files of a local dir / glob / file, or of a pyarrow URI (s3://, gs://...).

    Local files are returned as absolute paths, remote ones as URIs. Directories are walked
    recursively; hidden files and files without an image extension are skipped.
    """
    local = is_local(input_uri)
    pattern = input_uri[len("file://"):] if input_uri.startswith("file://") else input_uri
    files = _list_local(pattern) if local else _list_remote(input_uri)
    single = len(files) == 1 and not any(c in input_uri for c in GLOB_CHARS)
    return sorted(f for f in files if single or _has_extension(f, extensions))


def read_bytes(uri: str) -> bytes:
    """The bytes of a local path or a pyarrow URI."""
    if is_local(uri):
        with open(uri[len("file://"):] if uri.startswith("file://") else uri, "rb") as f:
            return f.read()
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# Per-file stage (pure functions; no Ray)
# ---------------------------------------------------------------------------------------------

def _uri_key(uri: str) -> int:
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "little")


def plan_crops(height: int, width: int, source_uri: str, *, patch_size: int, count: int,
               mode: str, seed: int) -> List[Tuple[int, int]]:
    """Top-left corners (y, x) of up to `count` patch_size crops of a height x width image.

    random: crop i is drawn from a generator seeded by (seed, source_uri, i); repeated corners
    (possible on small images) are kept once. grid: non-overlapping tiles in raster order.
    Returns [] when the image is smaller than one patch.
    """
    if height < patch_size or width < patch_size:
        return []
    if mode == "grid":
        tiles = [(y, x) for y in range(0, height - patch_size + 1, patch_size)
                 for x in range(0, width - patch_size + 1, patch_size)]
        return tiles[:count]
    if mode != "random":
        raise ValueError(f"unknown crop mode: {mode!r}")
    corners: List[Tuple[int, int]] = []
    for index in range(count):
        rng = np.random.default_rng([seed, CROP_STREAM, _uri_key(source_uri), index])
        corner = (int(rng.integers(height - patch_size + 1)), int(rng.integers(width - patch_size + 1)))
        if corner not in corners:
            corners.append(corner)
    return corners


def error_row(source_uri: str, stage: str, error: str) -> Dict[str, str]:
    """One ERROR_SCHEMA row."""
    return {"source_uri": source_uri, "stage": stage, "error": error}


def make_pair(hr: np.ndarray, source_uri: str, y: int, x: int, *, scale: int, seed: int,
              conversion: str, degradation: str = "realesrgan") -> Dict[str, Any]:
    """One PAIR_SCHEMA row (caption columns left out) from an HR patch, uint8 PxPx3 RGB."""
    size = hr.shape[0]
    sample_id = make_sample_id(source_uri, y, x, size)
    lr, params = degrade(hr, seed=seed, sample_id=sample_id, scale=scale, kind=degradation)
    return {"sample_id": sample_id, "source_uri": source_uri,
            "crop": json.dumps({"y": y, "x": x, "size": size}), "hr": encode_png(hr),
            "lr": encode_png(lr), "hr_size": size, "scale": scale,
            "degradation": json.dumps(params, sort_keys=True), "seed": seed,
            "conversion": conversion}


def process_source(source_uri: str, data: bytes, cfg: PrepareConfig,
                   skip_ids: Iterable[str] = ()) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, str]]]:
    """Decode one file, crop and degrade it: (pair rows, None) or ([], error row).

    Crops whose sample_id is in `skip_ids` are not produced (they are already written).
    """
    try:
        rgb, conversion = to_rgb8(load_image(data, source_uri), alpha=cfg.alpha)
    except (ImageDecodeError, ValueError) as exc:
        return [], error_row(source_uri, "decode", str(exc))
    height, width = rgb.shape[:2]
    corners = plan_crops(height, width, source_uri, patch_size=cfg.patch_size,
                         count=cfg.crops_per_image, mode=cfg.crop_mode, seed=cfg.seed)
    if not corners:
        return [], error_row(source_uri, "crop", f"too small: {width}x{height} < patch "
                                                 f"{cfg.patch_size}x{cfg.patch_size}")
    skip, size = set(skip_ids), cfg.patch_size
    rows = []
    for y, x in corners:
        if make_sample_id(source_uri, y, x, size) in skip:
            continue
        hr = np.ascontiguousarray(rgb[y:y + size, x:x + size])
        rows.append(make_pair(hr, source_uri, y, x, scale=cfg.scale, seed=cfg.seed,
                              conversion=conversion, degradation=cfg.degradation))
    return rows, None


def process_uri(source_uri: str, cfg: PrepareConfig,
                skip_ids: Iterable[str] = ()) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, str]]]:
    """`process_source` on a file read from its URI; unreadable files give an error row."""
    try:
        data = read_bytes(source_uri)
    except OSError as exc:
        return [], error_row(source_uri, "read", f"{type(exc).__name__}: {exc}")
    try:
        return process_source(source_uri, data, cfg, skip_ids)
    except Exception as exc:  # one bad file must not stop the job; the reason is recorded
        return [], error_row(source_uri, "degrade", f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Tables and atomic writes
# ---------------------------------------------------------------------------------------------

PAIR_COLUMNS_BEFORE_CAPTIONS = tuple(n for n in PAIR_SCHEMA.names if n not in CAPTION_COLUMNS)
_STAGE_SCHEMA = pa.schema([PAIR_SCHEMA.field(n) for n in PAIR_COLUMNS_BEFORE_CAPTIONS])


def pairs_table(rows: List[Dict[str, Any]]) -> pa.Table:
    """Rows of `make_pair` -> a table of PAIR_SCHEMA's columns without the caption columns."""
    return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA)


def conform_pairs(table: pa.Table) -> pa.Table:
    """A batch of pair rows -> exactly PAIR_SCHEMA; missing caption columns become ""."""
    columns = []
    for field in PAIR_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name in CAPTION_COLUMNS:
            columns.append(pa.array([""] * table.num_rows, field.type))
        else:
            raise ValueError(f"pair batch lacks column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=PAIR_SCHEMA)


def content_name(keys: Iterable[str]) -> str:
    """part-<hash>.parquet named by its keys: a retried write replaces, never duplicates."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{digest}{PARQUET_SUFFIX}"


def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def write_atomic(fs: pafs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` through a hidden temporary file in the same directory, then rename it."""
    directory, name = path.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    tmp = _join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise


def write_parquet_atomic(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    write_atomic(fs, path, lambda stream: pq.write_table(table, stream,
                                                         row_group_size=ROW_GROUP_ROWS))


def write_json_atomic(obj: Any, fs: pafs.FileSystem, path: str) -> None:
    write_atomic(fs, path, lambda stream: stream.write(json.dumps(obj, indent=2).encode()))


def write_shard(table: pa.Table, output: str) -> Optional[Dict[str, Any]]:
    """Write one shard of pair rows under output/shards; its {"shard", "rows"} or None if empty."""
    if table.num_rows == 0:
        return None
    fs, root = resolve_fs(output)
    table = conform_pairs(table)
    name = content_name(table.column("sample_id").to_pylist())
    write_parquet_atomic(table, fs, _join(root, SHARDS_DIR, name))
    return {"shard": f"{SHARDS_DIR}/{name}", "rows": table.num_rows}


def write_errors(rows: List[Dict[str, str]], output: str) -> None:
    """Write error rows as one part of output/errors (named by their sources)."""
    if rows:
        fs, root = resolve_fs(output)
        name = content_name(r["source_uri"] for r in rows)
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), fs,
                             _join(root, ERRORS_DIR, name))


# ---------------------------------------------------------------------------------------------
# Ray Data adapters (thin: the work is in the functions above)
# ---------------------------------------------------------------------------------------------

def degrade_batch(batch: pa.Table, cfg: Dict[str, Any]) -> pa.Table:
    """Batch of {source_uri, done_ids} -> pair rows; the batch's bad files go to output/errors."""
    cv2.setNumThreads(1)  # a Ray task holds one CPU; OpenCV would otherwise start a thread per core
    config = PrepareConfig(**cfg)
    pairs, errors = [], []
    for item in batch.to_pylist():
        rows, error = process_uri(item["source_uri"], config, item["done_ids"] or ())
        pairs.extend(rows)
        if error is not None:
            errors.append(error)
    write_errors(errors, config.output)
    return pairs_table(pairs)


WRITER_CPUS = 0  # logical CPUs of a shard-writing task (see build_dataset)
SHARD_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64())])


def shard_batch(batch: pa.Table, output: str) -> pa.Table:
    """Batch of pair rows -> one shard; returns its {"shard", "rows"} row (none when empty)."""
    written = write_shard(batch, output)
    return pa.Table.from_pylist([written] if written else [], schema=SHARD_SCHEMA)


def add_captions(ds, captioner: str, files_per_task: int = 1):
    """The caption stage of `pipeline.caption`, or the dataset unchanged when it is missing."""
    try:
        from pipeline.caption import CaptionConfig, add_caption_stage
    except ImportError as exc:
        print(f"prepare_data: pipeline.caption unavailable ({exc}); caption columns left empty",
              file=sys.stderr)
        return ds
    # template captions are a few string operations per row: they run inside the degrade tasks,
    # at their granularity (a larger batch here would make Ray Data's fusion bundle that many
    # files into each degrade task); qwen2vl runs on its own GPU actor pool at its own batch size
    batching = {"batch_size": files_per_task} if captioner == "template" else {}
    return add_caption_stage(ds, CaptionConfig(backend=captioner, **batching))


def build_dataset(items: List[Dict[str, Any]], cfg: PrepareConfig):
    """items ({source_uri, done_ids}) -> a Ray Dataset of written shards ({shard, rows})."""
    import ray

    compute = ray.data.TaskPoolStrategy(size=cfg.num_workers) if cfg.num_workers else None
    ds = ray.data.from_items(items)
    ds = ds.map_batches(degrade_batch, fn_kwargs={"cfg": asdict(cfg)}, batch_size=cfg.files_per_task,
                        batch_format="pyarrow", compute=compute)
    if cfg.captioner != "off":
        ds = add_captions(ds, cfg.captioner, cfg.files_per_task)
    # The shard writer only concatenates rows whose PNGs are already encoded: it asks for no CPU.
    # With the default of one CPU, Ray Data would (1) fuse it into the degrade operator, so that
    # each degrade task got `shard_rows` files and one task did the work of the whole job, and
    # (2) otherwise reserve a whole CPU of the budget for it, idle most of the time, leaving one
    # degrade task running on a 2-CPU machine.
    return ds.map_batches(shard_batch, fn_kwargs={"output": cfg.output}, batch_size=cfg.shard_rows,
                          batch_format="pyarrow", num_cpus=WRITER_CPUS)


# ---------------------------------------------------------------------------------------------
# Output state: what earlier runs finished
# ---------------------------------------------------------------------------------------------

def _finished_parts(fs: pafs.FileSystem, directory: str) -> List[str]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(PARQUET_SUFFIX))


def remove_temp_files(fs: pafs.FileSystem, root: str) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    removed = 0
    for directory in (root, _join(root, SHARDS_DIR), _join(root, ERRORS_DIR)):
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.File and info.base_name.startswith(TMP_PREFIX):
                fs.delete_file(info.path)
                removed += 1
    return removed


def _read_parquet(fs: pafs.FileSystem, path: str, columns=None) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def done_sample_ids(fs: pafs.FileSystem, root: str) -> Dict[str, Set[str]]:
    """source_uri -> sample_ids already in finished shards."""
    done: Dict[str, Set[str]] = {}
    for path in _finished_parts(fs, _join(root, SHARDS_DIR)):
        table = _read_parquet(fs, path, ["source_uri", "sample_id"])
        for source, sample_id in zip(table.column("source_uri").to_pylist(),
                                     table.column("sample_id").to_pylist()):
            done.setdefault(source, set()).add(sample_id)
    return done


def read_errors(fs: pafs.FileSystem, root: str) -> pa.Table:
    """All error rows so far (errors.parquet and unmerged parts), one per source_uri."""
    paths = _finished_parts(fs, _join(root, ERRORS_DIR))
    if fs.get_file_info(_join(root, ERRORS_FILE)).type == pafs.FileType.File:
        paths.append(_join(root, ERRORS_FILE))
    tables = [_read_parquet(fs, p).cast(ERROR_SCHEMA) for p in paths]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    unique = {row["source_uri"]: row for row in rows}
    return pa.Table.from_pylist([unique[k] for k in sorted(unique)], schema=ERROR_SCHEMA)


def merge_errors(fs: pafs.FileSystem, root: str) -> int:
    """Fold output/errors parts into errors.parquet (always written); returns its row count."""
    parts = _finished_parts(fs, _join(root, ERRORS_DIR))
    errors = read_errors(fs, root)
    write_parquet_atomic(errors, fs, _join(root, ERRORS_FILE))
    for path in parts:
        fs.delete_file(path)
    return errors.num_rows


def write_manifest(fs: pafs.FileSystem, root: str, cfg: PrepareConfig, n_errors: int) -> Dict[str, Any]:
    """manifest.json: every finished shard (path relative to the output) and its row count."""
    shards = []
    for path in _finished_parts(fs, _join(root, SHARDS_DIR)):
        with fs.open_input_file(path) as f:
            shards.append({"path": f"{SHARDS_DIR}/{path.rsplit('/', 1)[-1]}",
                           "rows": pq.ParquetFile(f).metadata.num_rows})
    manifest = {"format": "flowsr-pairs", "schema": PAIR_SCHEMA.names,
                "settings": cfg.data_settings(), "shards": shards,
                "total_rows": sum(s["rows"] for s in shards),
                "errors": {"path": ERRORS_FILE, "rows": n_errors}}
    write_json_atomic(manifest, fs, _join(root, MANIFEST_FILE))
    return manifest


def check_run_config(fs: pafs.FileSystem, root: str, cfg: PrepareConfig) -> None:
    """Record the pair-defining settings, or refuse to mix pairs made with other settings."""
    path = _join(root, RUN_CONFIG_FILE)
    settings = cfg.data_settings()
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            previous = json.loads(f.read())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ValueError(f"{cfg.output} holds pairs made with other settings ({changed}); "
                             f"write to a new output or rerun with {previous}")
        return
    write_json_atomic(settings, fs, path)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def plan_work(sources: Sequence[str], done: Dict[str, Set[str]], failed: Set[str],
              crops_per_image: int) -> List[Dict[str, Any]]:
    """{source_uri, done_ids} for every source that may still have crops to write."""
    return [{"source_uri": s, "done_ids": sorted(done.get(s, ()))} for s in sources
            if s not in failed and len(done.get(s, ())) < crops_per_image]


def prepare(cfg: PrepareConfig, *, on_shard: Optional[Callable[[Dict[str, Any]], None]] = None
            ) -> Dict[str, Any]:
    """Run the data stage; returns a summary dict. `on_shard` sees each shard as it is written."""
    start = time.perf_counter()
    sources = list_sources(cfg.input, cfg.extensions)
    fs, root = resolve_fs(cfg.output)
    fs.create_dir(root, recursive=True)
    check_run_config(fs, root, cfg)
    remove_temp_files(fs, root)
    done = done_sample_ids(fs, root)
    errors_before = read_errors(fs, root)
    failed = set(errors_before.column("source_uri").to_pylist())
    items = plan_work(sources, done, failed, cfg.crops_per_image)

    pairs = shards = 0
    if items:
        started = init_ray(cfg.address, num_cpus=cfg.num_cpus)
        try:
            for row in build_dataset(items, cfg).iter_rows():
                pairs, shards = pairs + row["rows"], shards + 1
                if on_shard is not None:
                    on_shard(row)
        finally:
            if started:
                import ray

                ray.shutdown()
    n_errors = merge_errors(fs, root)
    manifest = write_manifest(fs, root, cfg, n_errors)
    seconds = time.perf_counter() - start
    summary = {"output": cfg.output, "sources": len(sources), "skipped_sources": len(sources) - len(items),
               "pairs_written": pairs, "shards_written": shards,
               "errors_new": n_errors - errors_before.num_rows, "total_pairs": manifest["total_rows"],
               "total_shards": len(manifest["shards"]), "total_errors": n_errors,
               "seconds": round(seconds, 3), "pairs_per_s": round(pairs / max(seconds, 1e-9), 2)}
    print(f"prepare_data: wrote {pairs} pairs in {shards} shards ({summary['pairs_per_s']} pairs/s, "
          f"{seconds:.1f} s); {summary['errors_new']} new errors; {summary['skipped_sources']} of "
          f"{len(sources)} sources already done; output holds {summary['total_pairs']} pairs in "
          f"{summary['total_shards']} shards, {n_errors} errors -> {cfg.output}", flush=True)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[PrepareConfig, bool]:
    defaults = PrepareConfig(input="-", output="-")
    p = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="local dir, glob or file; or a pyarrow URI")
    p.add_argument("--output", required=True, help="output dir or URI (s3://, gs://, ...)")
    p.add_argument("--patch-size", type=int, default=defaults.patch_size)
    p.add_argument("--crops-per-image", type=int, default=defaults.crops_per_image)
    p.add_argument("--crop-mode", choices=CROP_MODES, default=defaults.crop_mode)
    p.add_argument("--degradation", choices=DEGRADATION_KINDS, default=defaults.degradation)
    p.add_argument("--scale", type=int, default=defaults.scale)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--shard-rows", type=int, default=defaults.shard_rows)
    p.add_argument("--captioner", choices=CAPTIONERS, default=defaults.captioner)
    p.add_argument("--files-per-task", type=int, default=defaults.files_per_task)
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    p.add_argument("--alpha", choices=ALPHA_MODES, default=defaults.alpha)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--dry-run", action="store_true", help="print the config and inputs, write nothing")
    add_ray_args(p)
    args = vars(p.parse_args(argv))
    dry_run = args.pop("dry_run")
    return PrepareConfig(**args), dry_run


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg, dry_run = parse_args(argv)
    if dry_run:
        sources = list_sources(cfg.input, cfg.extensions)
        print(json.dumps({**asdict(cfg), "sources": len(sources)}, indent=2))
        return {"sources": len(sources)}
    return prepare(cfg)


if __name__ == "__main__":
    main()
