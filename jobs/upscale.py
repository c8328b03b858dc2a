"""Bulk upscaling with Ray Data batch inference.

    python -m jobs.upscale -i IN -o OUT -m MODEL [-s SCALE] [--steps 1] [-t 128] [--tile_pad 16]
        [--ext auto|png|jpg|webp] [--suffix S] [--batch-size 8] [--num-gpus 1] [--pool-size P]
        [--allow-errors] [--address ...]
    (also `python -m jobs.upscale IN OUT -m MODEL`)

MODEL is a FlowSR checkpoint (folder or URI), an SR weights file that spandrel reads
(Real-ESRGAN / ESRGAN, SwinIR, HAT, DAT, ...: `pipeline.sr_models`), or a FlowSR one-step ONNX
export (`flowsr export`, run by onnxruntime: `--backend onnxruntime`); all run through the same
job. Real-ESRGAN's spellings keep Real-ESRGAN's meanings: `-i/-o`, `--model_path`, `--tile` and
`--tile_pad` in input pixels, `--outscale`, `--ext auto`, `--suffix` joined with `_`,
`--pre_pad`, `--fp32`; where the job differs, the option's help says so.

list inputs, a folder at a time, and plan output names per folder (driver, streamed into
Parquet chunks) -> probe headers, skip valid outputs (CPU tasks) -> sort by output-size bucket
(Ray Data) -> read + decode (CPU tasks) -> upscale (actor pool, model loaded once per actor) ->
encode + atomic write (CPU tasks). Decoding and writing run as separate stages, so they overlap
the accelerator's work. The driver holds counters, never rows (at most one folder's listing).

The manifest is written part by part: every finished batch of rows (the probe's skipped, error
and unsupported rows too) is committed atomically as a part in OUT/_manifest-parts before the
batch's images are moved into place, so a killed run leaves a row for every output it wrote. At
the end the parts are streamed into OUT/manifest.parquet (or --manifest) and removed. A rerun
removes a killed run's parts and probes every output again (valid ones are `skipped` rows): the
manifest lists each input exactly once, with the last run's status and the sha256 of the input
bytes its output was made from (`input_sha256`). Each output records that digest too, so an input
edited in place since (same size or not) is redone on a rerun, with no earlier manifest read.

The checkpoint, the options and the cluster address are checked before the corpus or OUT is
touched. Exit status (`jobs.common`, the same for every job): 0 when every input is ok, skipped
or unsupported (a listed file that is not an image: a manifest row with the reason); 1 when any
input failed (error rows in the manifest; `--allow-errors` makes that 0); 2 when the job stops
early with one line (a usage mistake, an output that cannot be written or a full disk, a cluster
that does not answer); 130 / 143 on SIGINT / SIGTERM (committed parts kept, no manifest). The
last stderr line of a finished run is the summary, with counts by status.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from flowsr.metrics_log import progress_text
from jobs.common import (EXIT_OK, EXIT_USAGE, add_allow_errors_arg, add_ray_args, connect_first, exit_status,
                         fit_actor_cpus, gpu_pool_size, init_ray, is_local, log, run_job)

BACKENDS = ("torch", "onnxruntime")  # = pipeline.sr_models.BACKENDS (not imported here: it loads torch)

# rows per probe unit (and per pending part): the driver holds a path per pending part, so
# 10^8 inputs are ~100k paths (~10 MB); a unit probes in ~0.15 s
PROBE_BLOCK = 1024
SHUFFLE_PARTITION_ROWS, MAX_SHUFFLE_PARTITIONS = 20_000, 1000  # the sort by output size and the plan of a list
LISTING_CHUNK_ROWS = 50_000  # listed inputs per listing chunk: the listing never sits whole in the driver
MAX_SCALE = 16.0  # output / input size; beyond it the bicubic start carries no information


class UsageError(Exception):
    """A mistake in the command line, the input or the checkpoint: one line, exit status 2."""
IO_BATCH = 4  # rows per decode / write task call
PROGRESS_EVERY_S = 10.0
STEADY_MIN_FACTOR = 3  # report a steady rate only with this many times the first batch's rows
# UpscaleJobConfig fields that change the output pixels or names (the run record's params).
RESULT_FIELDS = ("scale", "steps", "tile", "tile_overlap", "pre_pad", "vae_tile", "color_fix", "format",
                 "suffix", "dtype", "pretrained", "weights")


@dataclass(frozen=True)
class UpscaleJobConfig:
    input: str
    output: str
    checkpoint: str  # a FlowSR checkpoint or an SR weights file (pipeline.sr_models)
    scale: Optional[float] = None  # None: the model's native scale (4 for FlowSR)
    steps: int = 1
    tile: int = 128  # input (LR) pixels, as Real-ESRGAN's --tile; 0 = whole images
    tile_overlap: int = 16  # input pixels, as Real-ESRGAN's --tile_pad
    pre_pad: int = 0  # input pixels of reflection at the bottom and right (weights files)
    vae_tile: int = 512  # output pixels (FlowSR)
    color_fix: str = "wavelet"
    format: str = "same"
    suffix: str = ""
    path_column: str = "path"  # for a Parquet input
    manifest: Optional[str] = None  # default OUT/manifest.parquet
    batch_size: int = 8  # images per upscaler call
    tile_batch: int = 16  # tiles per network forward
    bucket: int = 64  # output sizes rounded up to this share a padded batch
    pool_size: Optional[int] = None  # None: one actor per GPU of the cluster (jobs.common.gpu_pool_size)
    num_gpus: Optional[float] = None  # per actor; None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; None: bf16 on GPU, fp32 on CPU
    compile: bool = False
    compile_cache_dir: Optional[str] = None
    pretrained: Optional[str] = None  # override the SD base model location in the checkpoint
    weights: str = "student"  # student | target (EMA)
    backend: Optional[str] = None  # torch | onnxruntime; None: by the model (onnxruntime for an .onnx export)
    max_pixels: int = 150_000_000  # input pixels (from the header, before decode); = upscale_io.MAX_PIXELS
    max_output_pixels: int = 400_000_000  # output pixels; = upscale_io.MAX_OUTPUT_PIXELS
    max_bytes: int = 1 << 30  # input file size; = upscale_io.MAX_BYTES
    glob: Optional[bool] = None  # None: a path that exists is literal, else a glob; True: always a glob
    allow_errors: bool = False  # exit 0 even when some inputs failed
    address: Optional[str] = None
    fail_after: int = -1  # test switch: an upscaler actor crashes after this many images
    overwrite: bool = False  # replace the output's earlier results instead of resuming them

    def __post_init__(self):
        from flowsr.color import COLOR_FIXES
        from pipeline.upscale_io import OUTPUT_FORMATS

        if self.scale is not None and not (math.isfinite(self.scale) and 0 < self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be a finite number in (0, {MAX_SCALE:g}], got {self.scale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.vae_tile < 0:
            raise ValueError(f"vae_tile must be >= 0, got {self.vae_tile}")
        if min(self.max_pixels, self.max_output_pixels, self.max_bytes) < 1:
            raise ValueError("max_pixels, max_output_pixels and max_bytes must be >= 1")
        if self.format == "auto":  # Real-ESRGAN's name for "the input's format"
            object.__setattr__(self, "format", "same")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format: {self.format!r} (choose from {', '.join(OUTPUT_FORMATS)})")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend: {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {self.color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
        if min(self.batch_size, self.tile_batch, self.bucket,
               1 if self.pool_size is None else self.pool_size) < 1:
            raise ValueError("batch_size, tile_batch, bucket and pool_size must be >= 1")
        if min(self.tile, self.tile_overlap, self.pre_pad) < 0 or (self.tile and self.tile <= self.tile_overlap):
            raise ValueError(f"need tile > tile_overlap >= 0 (or tile 0) and pre_pad >= 0, got tile={self.tile}, "
                             f"tile_overlap={self.tile_overlap}, pre_pad={self.pre_pad}")

    def record(self) -> dict:
        """The run record (`pipeline.output`): what decides the output pixels, and the checkpoint's
        digest. A rerun into the same OUT with other values is refused (`--overwrite` to replace)."""
        from pipeline import output as out
        from pipeline.fingerprint import checkpoint_digest

        params = {name: getattr(self, name) for name in RESULT_FIELDS}
        try:
            checkpoint = checkpoint_digest(self.checkpoint)
        except out.OutputError:  # a model name, not a path: recorded as given
            checkpoint = self.checkpoint
        return out.run_record("upscale", self.input, params, checkpoint)

    def upscaler_options(self) -> dict:
        """Keyword arguments of `pipeline.sr_models.load_upscaler` (tiles in input pixels)."""
        return dict(scale=self.scale, steps=self.steps, tile=self.tile or None, tile_overlap=self.tile_overlap,
                    pre_pad=self.pre_pad, vae_tile=self.vae_tile or None, color_fix=self.color_fix,
                    tile_batch=self.tile_batch, bucket=self.bucket, dtype=self.dtype, compile=self.compile,
                    compile_cache_dir=self.compile_cache_dir, pretrained=self.pretrained, weights=self.weights,
                    backend=self.backend)

    @property
    def name_suffix(self) -> str:
        """What output stems get: `_` + suffix, as Real-ESRGAN names img.png -> img_out.png."""
        return f"_{self.suffix}" if self.suffix else ""


def resolve_model(cfg: UpscaleJobConfig) -> UpscaleJobConfig:
    """`cfg` with the scale resolved from the model (its native scale unless given); a model
    argument that names nothing runnable raises `pipeline.sr_models.ModelError` (one line)."""
    from pipeline.sr_models import backend_for, describe

    backend = backend_for(cfg.checkpoint, cfg.backend)
    info = describe(cfg.checkpoint)
    scale = info.scale(cfg.scale)
    native = f"native x{info.native_scale}" if info.native_scale else "any scale"
    hint = {"discouraged": "; spandrel discourages tiling it (--tile 0 if memory allows)",
            "internal": "; it tiles internally (run on whole images)"}.get(info.tiling, "")
    print(f"[upscale] model: {info.name}, {native}; output x{scale:g}{hint}; backend {backend}", file=sys.stderr,
          flush=True)
    return dataclasses.replace(cfg, scale=scale, backend=backend)


def _arrow(fn, **kwargs):
    """A dict-of-lists stage as a pyarrow-batch function."""
    def run(table):
        return _to_table(fn(table.to_pydict(), **kwargs))
    return run


def _to_table(columns: dict):
    import pyarrow as pa

    return pa.table({k: pa.array(v, type=pa.large_binary()) if k in ("pixels", "alpha") else v
                     for k, v in columns.items()})


def _make_upscale_stage():
    from pipeline.upscale_io import UpscaleStage

    class ArrowUpscaleStage(UpscaleStage):
        def __call__(self, table):
            return _to_table(super().__call__(table.to_pydict()))
    return ArrowUpscaleStage


def upscale_corpus(cfg: UpscaleJobConfig) -> dict:
    """Upscale every input once; returns a summary (counts, seconds, images/s, manifest path).

    Connects to the cluster first (a dead `--address` fails in one line before OUT is touched),
    then holds OUT's lease and checks its run record (`pipeline.output`): a concurrent run or a
    rerun with another checkpoint / settings is refused with one line (OutputError)."""
    import ray

    from pipeline import output as out
    from pipeline import upscale_io as io

    if cfg.scale is None:
        cfg = resolve_model(cfg)
    check_before_run(cfg)  # before OUT or the corpus is touched
    try:
        exclude = [cfg.output]  # when it lies inside the input (a folder or a bucket prefix)
        listing = io.list_input_groups(cfg.input, path_column=cfg.path_column, glob=cfg.glob, exclude=exclude)
    except (FileNotFoundError, NotADirectoryError, KeyError) as err:
        raise UsageError(f"input {cfg.input}: {err}") from err
    connected = connect_first(cfg.address)  # a cluster that does not answer: one line, OUT untouched
    try:
        # clear_recursive=False: OUT holds an image per input; the job clears its own folders itself
        with out.open_output(cfg.output, cfg.record(), overwrite=cfg.overwrite, remove_results=False,
                             clear_recursive=False):
            return _upscale_corpus(cfg, listing)
    finally:
        if connected:
            ray.shutdown()


def _clear(uri: str) -> None:
    from pipeline.storage import resolve_fs

    fs, path = resolve_fs(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def _upscale_corpus(cfg: UpscaleJobConfig, listing) -> dict:
    """Upscale every input of `listing` once (OUT's lease held); returns the summary. The driver
    holds counters, never rows: the listing streams into chunks, probing and upscaling run in Ray
    Data, and each finished batch's rows are committed as a manifest part in OUT/PARTS_DIR,
    consolidated into the manifest only when every input has its row: a run that stops early
    (a signal, a full disk) leaves its parts and no manifest, and the next run redoes the rest."""
    import ray

    from pipeline import output as out
    from pipeline import upscale_io as io

    start = time.perf_counter()
    manifest = cfg.manifest or io.join_uri(cfg.output, io.MANIFEST_NAME)
    parts = io.join_uri(cfg.output, io.PARTS_DIR)
    io.clear_tmp(cfg.output)
    _clear(parts)  # a killed run's parts: this run probes its outputs again (skipped rows)
    out.remove_file(manifest)  # an earlier run's manifest: only a finished run leaves one
    chunks, chunk_rows, planned = io.write_listing(listing, io.join_uri(io.tmp_root(cfg.output), "listing"), cfg.output,
                                               cfg.format, cfg.name_suffix, LISTING_CHUNK_ROWS)
    started_ray = init_ray(cfg.address) if chunks else False
    steady = None
    try:
        if chunks:
            pending, mixed = _probe(cfg, chunks, chunk_rows, planned, parts)
            if pending:
                steady = _run_pipeline(cfg, parts, pending, sort=mixed)
    finally:
        if started_ray:
            ray.shutdown()
    counts = io.consolidate_manifest(parts, manifest)
    out.remove_dir(*io.split_uri(parts))
    io.clear_tmp(cfg.output)
    counts = {s: counts.get(s, 0) for s in (io.OK, io.SKIPPED, io.ERROR, io.UNSUPPORTED)}
    seconds = time.perf_counter() - start
    summary = {"total": sum(counts.values()), **counts, "seconds": round(seconds, 3),
               "images_per_s": round(counts[io.OK] / seconds, 3) if seconds else 0.0,
               "steady_images_per_s": steady, "manifest": manifest}
    print(f"[upscale] {json.dumps(summary)}", file=sys.stderr, flush=True)
    return summary


def _partitions(rows: int) -> int:
    """Partitions for a shuffle of `rows` rows (Ray's default, 200, is for big data)."""
    return max(1, min(MAX_SHUFFLE_PARTITIONS, math.ceil(rows / SHUFFLE_PARTITION_ROWS)))


def _probe(cfg: UpscaleJobConfig, chunks: list, chunk_rows: list, planned: bool, parts: str) -> Tuple[list, bool]:
    """Listing chunks -> [plan per folder key] -> probe (Ray tasks): finished rows become manifest
    parts, pending rows pending parts (OUT/.flowsr-tmp/pending). Returns the pending parts as
    (path, rows) pairs (one per probe unit of PROBE_BLOCK inputs, not one per input) and whether
    their rows fall in more than one output-size bucket."""
    import ray

    from pipeline import upscale_io as io
    from pipeline.listing import ListingUnits

    fs, _ = io.split_uri(cfg.output)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    ds = ListingUnits(fs, chunks, chunk_rows, PROBE_BLOCK).rows_dataset(cluster_cpus)
    if not planned:  # a Parquet list: names compete within a folder, so plan folder by folder
        ds = ds.groupby("key", num_partitions=_partitions(sum(chunk_rows))).map_groups(_arrow(io.plan_batch, output_root=cfg.output, fmt=cfg.format,
                                                 suffix=cfg.name_suffix), batch_format="pyarrow")
        ds = ds.repartition(target_num_rows_per_block=PROBE_BLOCK)
    ds = ds.map_batches(_arrow(io.probe_and_commit, parts_dir=parts, pending_dir=_pending_dir(cfg), bucket=cfg.bucket,
                               scale=cfg.scale, resume=not cfg.overwrite, max_pixels=cfg.max_pixels,
                               max_output_pixels=cfg.max_output_pixels, max_bytes=cfg.max_bytes),
                        batch_format="pyarrow", batch_size=None)  # a unit (a block) at a time, in the reading task
    counts = dict.fromkeys((io.PENDING, io.SKIPPED, io.ERROR, io.UNSUPPORTED), 0)
    pending, first_bucket, mixed = [], None, False
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for status in counts:
            counts[status] += sum(batch.column(status).to_pylist())
        for path, rows, key in zip(*(batch.column(c).to_pylist() for c in ("pending_part", "pending_rows", "pending_bucket"))):
            if rows:
                pending.append((path, rows))
                first_bucket = first_bucket or key
                mixed = mixed or key != first_bucket or key == io.MIXED_BUCKETS
    log.info("upscale: %d to do, %d skipped (valid output), %d errors, %d unsupported", *counts.values())
    return pending, mixed


def _pending_dir(cfg: UpscaleJobConfig) -> str:
    from pipeline import upscale_io as io

    return io.join_uri(io.tmp_root(cfg.output), "pending")


def check_before_run(cfg: UpscaleJobConfig) -> None:
    """Usage mistakes found before the corpus is touched, as UsageError: a missing or unreadable
    checkpoint (config and weights), an output folder that is a file."""
    from flowsr.checkpoint import check_checkpoint
    from pipeline.sr_models import FLOWSR, ONNXRUNTIME, backend_for, check_onnx_options, model_kind
    from pipeline.storage import resolve_fs

    try:
        if backend_for(cfg.checkpoint, cfg.backend) == ONNXRUNTIME:
            check_onnx_options(cfg.steps, cfg.dtype, cfg.compile)
        if model_kind(cfg.checkpoint) == FLOWSR and is_local(cfg.checkpoint):  # weights files: describe()
            check_checkpoint(cfg.checkpoint, weights=cfg.weights)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"model: {err}") from err
    import pyarrow.fs as pafs

    fs, path = resolve_fs(cfg.output)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise UsageError(f"output {cfg.output} is a file, not a folder")


def actor_cpus(cfg: UpscaleJobConfig, cluster_cpus: float) -> float:
    """Logical CPUs per upscaler actor (`jobs.common.fit_actor_cpus`): a 1-CPU local Ray hung, the
    actor holding the CPU that decoding needed."""
    actors = 1 if cfg.pool_size is None else cfg.pool_size  # None: sized by GPUs, 1 on a CPU cluster
    return fit_actor_cpus(cfg.cpus_per_actor, actors, cluster_cpus, "upscale")


def _run_pipeline(cfg: UpscaleJobConfig, parts: str, pending: list, sort: bool = True) -> Optional[float]:
    """The `pending` parts ((path, rows) pairs), ordered by output-size bucket (a Ray Data sort,
    when there is more than one batch and `sort`: their rows fall in more than one bucket),
    through decode -> upscale -> write, each write batch committing its manifest part. The
    driver sees one row of counts per batch. Returns the steady rate: rows/s from the first
    finished batch to the last (startup excluded)."""
    import ray

    from pipeline import upscale_io as io
    from pipeline.listing import ListingUnits

    num_gpus = cfg.num_gpus
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    cfg = dataclasses.replace(cfg, pool_size=gpu_pool_size(cfg.pool_size, num_gpus, ray.cluster_resources()))
    fs, _ = io.split_uri(_pending_dir(cfg))
    paths, rows = [p for p, _ in pending], [n for _, n in pending]
    todo = sum(rows)
    ds = ListingUnits(fs, paths, rows, PROBE_BLOCK).rows_dataset(ray.cluster_resources().get("CPU", 1))
    if sort and todo > cfg.batch_size:  # one batch needs no order
        ds.context.default_hash_shuffle_parallelism = _partitions(todo)  # this dataset's own context
        ds = ds.sort(["bucket_h", "bucket_w", "input"])
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(_arrow(io.decode_batch, max_pixels=cfg.max_pixels), batch_format="pyarrow", batch_size=IO_BATCH)
    stage_kwargs = {**cfg.upscaler_options(), "fail_after": cfg.fail_after}
    ds = ds.map_batches(_make_upscale_stage(), fn_constructor_args=(cfg.checkpoint,), fn_constructor_kwargs=stage_kwargs,
                        batch_format="pyarrow", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.pool_size), num_gpus=num_gpus,
                        num_cpus=actor_cpus(cfg, ray.cluster_resources().get("CPU", 0)))
    ds = ds.map_batches(_arrow(io.write_and_count, output_root=cfg.output, parts_dir=parts), batch_format="pyarrow",
                        batch_size=IO_BATCH)
    start = last = time.perf_counter()
    first = None
    done = errors = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok, failed = sum(batch.column(io.OK).to_pylist()), sum(batch.column(io.ERROR).to_pylist())
        done, errors = done + ok + failed, errors + failed
        now = time.perf_counter()
        first = first or (now, done)
        if now - last > PROGRESS_EVERY_S or done == todo:
            log.info("upscale %s (%d errors)", progress_text(done, todo, now - start), errors)
            last = now
    if first is None or done < STEADY_MIN_FACTOR * first[1]:
        return None  # too few batches after the first one to say
    return round((done - first[1]) / (time.perf_counter() - first[0]), 3)


# ---- command line ---------------------------------------------------------------------------
ALPHA_UPSAMPLERS = ("bicubic", "realesrgan")


def add_upscale_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `python -m jobs.upscale` and `flowsr upscale`: input and output as IN OUT
    or -i/-o, and Real-ESRGAN's spellings with Real-ESRGAN's meanings."""
    d = {f.name: f.default for f in dataclasses.fields(UpscaleJobConfig)}
    p.add_argument("input_arg", nargs="?", metavar="IN", help="same as -i/--input")
    p.add_argument("output_arg", nargs="?", metavar="OUT", help="same as -o/--output")
    p.add_argument("--input", "-i", default=None, help="folder, glob, file, URI or Parquet file with a path column")
    p.add_argument("--output", "-o", default=None, help="output folder (mirrors the input names)")
    p.add_argument("--model", "-m", "--model_path", "--model-path", "--checkpoint", dest="checkpoint", required=True,
                   metavar="MODEL", help="a FlowSR checkpoint folder (or URI), or an SR weights file that spandrel "
                                         "reads (.pth/.pt/.ckpt/.safetensors: Real-ESRGAN, SwinIR, HAT, DAT, ...)")
    p.add_argument("--scale", "-s", "--outscale", type=float, default=None,
                   help=f"output / input size in (0, {MAX_SCALE:g}] (default: the model's native scale; 4 for FlowSR); a weights "
                        "file's output is resized to it (bicubic, antialiased; Real-ESRGAN's --outscale: Lanczos)")
    p.add_argument("--steps", type=int, default=d["steps"], help="Euler steps, 1 = one-step SR (FlowSR)")
    p.add_argument("--tile", "-t", type=int, default=d["tile"],
                   help="tile size in input (LR) pixels, 0: whole images (as Real-ESRGAN's --tile, but the tile "
                        "includes its overlap)")
    p.add_argument("--tile-overlap", "--tile_pad", type=int, default=d["tile_overlap"],
                   help="overlap of neighbouring tiles in input pixels, blended with Gaussian weights (Real-ESRGAN's "
                        "--tile_pad: context around each tile, cropped)")
    p.add_argument("--pre-pad", "--pre_pad", type=int, default=d["pre_pad"],
                   help="input pixels of reflection added at the bottom and right, then cropped (weights files)")
    p.add_argument("--vae-tile", type=int, default=d["vae_tile"],
                   help="VAE tile size in output pixels, 0: none (FlowSR)")
    p.add_argument("--color-fix", choices=("wavelet", "adain", "none"), default=d["color_fix"],
                   help="colour correction against the upscaled LR (FlowSR)")
    p.add_argument("--format", "--ext", choices=("same", "auto", "png", "jpg", "webp"), default=d["format"],
                   help="output format; same = auto: the input's (PNG/JPEG/WebP; other inputs become PNG)")
    p.add_argument("--suffix", default=d["suffix"],
                   help="added to each output's stem after '_' (img.png -> img_SUFFIX.png, as Real-ESRGAN; "
                        "default: none, where Real-ESRGAN adds _out)")
    p.add_argument("--alpha-upsampler", "--alpha_upsampler", choices=ALPHA_UPSAMPLERS, default="bicubic",
                   help="how alpha is upscaled: bicubic only (Real-ESRGAN's default, realesrgan, is not supported)")
    p.add_argument("--path-column", default=d["path_column"], help="path column of a Parquet input")
    p.add_argument("--manifest", default=None, help="manifest Parquet (default OUT/manifest.parquet)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="images per upscaler call")
    p.add_argument("--tile-batch", type=int, default=d["tile_batch"],
                   help="tiles per network forward")
    p.add_argument("--bucket", type=int, default=d["bucket"], help="size bucket for dense batches, output pixels")
    p.add_argument("--pool-size", type=int, default=d["pool_size"],
                   help="upscaler actors (default: one per GPU of the cluster at the start, 1 without GPUs)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=d["cpus_per_actor"],
                   help="CPUs each upscaler actor asks Ray for")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default: bf16 on GPU (fp16 or fp32 for a weights file without bf16), fp32 on CPU")
    p.add_argument("--fp32", dest="dtype", action="store_const", const="fp32", help="same as --dtype fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--compile-cache-dir", default=None, help="inductor cache shared by the actors")
    p.add_argument("--pretrained", default=None, help="override the SD base model location (FlowSR)")
    p.add_argument("--weights", choices=("student", "target"), default=d["weights"], help="FlowSR weights to run")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what runs the network: torch (a checkpoint or weights file) or onnxruntime (a FlowSR .onnx "
                        "export from `flowsr export`; one step, whole tiles, no --vae-tile); default: by the model")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help="input pixel cap, checked from the header before decoding (per-item error above it)")
    p.add_argument("--max-output-pixels", type=int, default=d["max_output_pixels"], help="output pixel cap")
    p.add_argument("--max-bytes", type=int, default=d["max_bytes"], help="input file size cap")
    p.add_argument("--glob", action="store_true", default=None,
                   help="read the input as a glob even if a file or folder of that name exists")
    add_allow_errors_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT's earlier results (another checkpoint or settings) instead of refusing")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    add_ray_args(p)


def _one_of(positional: Optional[str], option: Optional[str], name: str) -> str:
    if positional and option and positional != option:
        raise ValueError(f"two {name}s given: {positional} and {option}")
    if not (positional or option):
        raise ValueError(f"give the {name} as -{name[0]}/--{name} (or positionally: IN OUT)")
    return positional or option


def config_from_args(args: argparse.Namespace) -> UpscaleJobConfig:
    if args.alpha_upsampler != "bicubic":
        raise ValueError(f"--alpha_upsampler {args.alpha_upsampler} is not supported: alpha is upscaled bicubically")
    names = {f.name for f in dataclasses.fields(UpscaleJobConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["input"] = _one_of(args.input_arg, args.input, "input")
    values["output"] = _one_of(args.output_arg, args.output, "output")
    return UpscaleJobConfig(**values)


def _usage_error(err: Exception) -> None:
    print(f"upscale: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE) from None


def run_from_args(args: argparse.Namespace):
    """Run the job; returns the exit status: 0, or 1 when inputs failed (`--allow-errors`: 0).
    Config errors, a model argument that names nothing runnable, a checkpoint or input that is
    not there: one line on stderr, exit 2 (SystemExit)."""
    try:
        cfg = resolve_model(config_from_args(args))
    except ValueError as err:
        _usage_error(err)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return EXIT_OK
    from pipeline.output import OutputError

    try:
        summary = upscale_corpus(cfg)
    except (UsageError, OutputError) as err:  # OutputError: OUT is leased, or holds other settings' results
        _usage_error(err)
    return exit_status(summary["error"], cfg.allow_errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_upscale_options(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_job("upscale", main))
