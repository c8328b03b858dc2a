"""Bulk upscaling with Ray Data batch inference.

    python -m jobs.upscale --input IN --output OUT --checkpoint CKPT [--scale 4] [--steps 1]
        [--tile 512] [--tile-overlap 64] [--format same|png|jpg|webp] [--batch-size 8]
        [--num-gpus 1] [--pool-size 1] [--allow-errors] [--address ...]

list inputs and plan output names (driver) -> probe headers, skip valid outputs (CPU tasks)
-> sort by output-size bucket (driver) -> read + decode (CPU tasks) -> upscale (actor pool,
model loaded once per actor) -> encode + atomic write (CPU tasks) -> manifest Parquet.
Decoding and writing run as separate stages, so they overlap the accelerator's work.

The checkpoint and the options are checked before the corpus is touched. Exit status: 0 when
every input is ok, skipped or unsupported (a listed file that is not an image: a manifest row
with the reason); 1 when any input failed (error rows in the manifest; `--allow-errors` makes
that 0); 2 for a usage mistake (bad option, missing input or checkpoint), told in one line.
The last stderr line is the summary, with counts by status.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

from jobs.common import add_ray_args, init_ray

PROBE_BLOCK = 64  # rows per probe task
MAX_SCALE = 16.0  # output / input size; beyond it the bicubic start carries no information
EXIT_OK, EXIT_ITEM_ERRORS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line, the input or the checkpoint: one line, exit status 2."""
IO_BATCH = 4  # rows per decode / write task call
PROGRESS_EVERY_S = 10.0
STEADY_MIN_FACTOR = 3  # report a steady rate only with this many times the first batch's rows


@dataclass(frozen=True)
class UpscaleJobConfig:
    input: str
    output: str
    checkpoint: str
    scale: float = 4.0
    steps: int = 1
    tile: int = 512  # output pixels; 0 = whole images
    tile_overlap: int = 64
    vae_tile: int = 512
    color_fix: str = "wavelet"
    format: str = "same"
    suffix: str = ""
    path_column: str = "path"  # for a Parquet input
    manifest: Optional[str] = None  # default OUT/manifest.parquet
    batch_size: int = 8  # images per upscaler call
    tile_batch: int = 16  # tiles per network forward
    bucket: int = 64  # output sizes rounded up to this share a padded batch
    pool_size: int = 1
    num_gpus: Optional[float] = None  # per actor; None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; None: bf16 on GPU, fp32 on CPU
    compile: bool = False
    compile_cache_dir: Optional[str] = None
    pretrained: Optional[str] = None  # override the SD base model location in the checkpoint
    weights: str = "student"  # student | target (EMA)
    max_pixels: int = 150_000_000  # input pixels (from the header, before decode); = upscale_io.MAX_PIXELS
    max_output_pixels: int = 400_000_000  # output pixels; = upscale_io.MAX_OUTPUT_PIXELS
    max_bytes: int = 1 << 30  # input file size; = upscale_io.MAX_BYTES
    glob: Optional[bool] = None  # None: a path that exists is literal, else a glob; True: always a glob
    allow_errors: bool = False  # exit 0 even when some inputs failed
    address: Optional[str] = None
    fail_after: int = -1  # test switch: an upscaler actor crashes after this many images

    def __post_init__(self):
        from flowsr.sample import COLOR_FIXES
        from pipeline.upscale_io import OUTPUT_FORMATS

        if not (math.isfinite(self.scale) and 0 < self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be a finite number in (0, {MAX_SCALE:g}], got {self.scale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.tile < 0 or self.vae_tile < 0 or self.tile_overlap < 0:
            raise ValueError("tile, vae_tile and tile_overlap must be >= 0")
        for name in ("tile", "vae_tile"):
            if getattr(self, name) and getattr(self, name) <= self.tile_overlap:
                raise ValueError(f"{name}={getattr(self, name)} must be larger than tile_overlap={self.tile_overlap}")
        if min(self.max_pixels, self.max_output_pixels, self.max_bytes) < 1:
            raise ValueError("max_pixels, max_output_pixels and max_bytes must be >= 1")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format: {self.format!r} (choose from {', '.join(OUTPUT_FORMATS)})")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {self.color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
        if min(self.batch_size, self.tile_batch, self.bucket, self.pool_size) < 1:
            raise ValueError("batch_size, tile_batch, bucket and pool_size must be >= 1")

    def upscaler_options(self) -> dict:
        return dict(scale=self.scale, steps=self.steps, tile=self.tile or None, tile_overlap=self.tile_overlap,
                    vae_tile=self.vae_tile or None, color_fix=self.color_fix, tile_batch=self.tile_batch,
                    bucket=self.bucket, dtype=self.dtype, compile=self.compile,
                    compile_cache_dir=self.compile_cache_dir, pretrained=self.pretrained, weights=self.weights)


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


def _bucket_order(row: dict, bucket: int):
    return (math.ceil(row["out_height"] / bucket), math.ceil(row["out_width"] / bucket), row["input"])


def upscale_corpus(cfg: UpscaleJobConfig) -> dict:
    """Upscale every input once; returns a summary (counts, seconds, images/s, manifest path)."""
    import ray

    from pipeline import upscale_io as io

    start = time.perf_counter()
    check_before_run(cfg)
    try:
        inputs = io.scan_inputs(cfg.input, path_column=cfg.path_column, glob=cfg.glob)
    except (FileNotFoundError, NotADirectoryError, KeyError) as err:
        raise UsageError(f"input {cfg.input}: {err}") from err
    started_ray = init_ray(cfg.address)
    manifest = cfg.manifest or io.join_uri(cfg.output, io.MANIFEST_NAME)
    rows = io.plan_outputs(inputs, cfg.output, cfg.format, cfg.suffix)
    io.clear_tmp(cfg.output)
    done, results, steady = [], [], None
    try:
        if rows:
            probed = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / PROBE_BLOCK)))
            probed = probed.map_batches(_arrow(io.probe_batch, scale=cfg.scale, max_pixels=cfg.max_pixels,
                                                           max_output_pixels=cfg.max_output_pixels,
                                                           max_bytes=cfg.max_bytes), batch_format="pyarrow",
                                        batch_size=PROBE_BLOCK).take_all()
            todo = sorted((r for r in probed if r["status"] == io.PENDING), key=lambda r: _bucket_order(r, cfg.bucket))
            done = [r for r in probed if r["status"] != io.PENDING]
            if todo:
                steady = _run_pipeline(cfg, todo, results, len(rows), len(done))
    finally:
        io.write_manifest(done + results, manifest, io.tmp_root(cfg.output))
        io.clear_tmp(cfg.output)
        if started_ray:
            ray.shutdown()
    everything = done + results
    counts = {s: sum(r["status"] == s for r in everything) for s in (io.OK, io.SKIPPED, io.ERROR, io.UNSUPPORTED)}
    seconds = time.perf_counter() - start
    summary = {"total": len(rows), **counts, "seconds": round(seconds, 3),
               "images_per_s": round(counts[io.OK] / seconds, 3) if seconds else 0.0,
               "steady_images_per_s": steady, "manifest": manifest}
    print(f"[upscale] {json.dumps(summary)}", file=sys.stderr, flush=True)
    return summary


def check_before_run(cfg: UpscaleJobConfig) -> None:
    """Usage mistakes found before the corpus is touched, as UsageError: a missing or unreadable
    checkpoint (config and weights), an output folder that is a file."""
    from flowsr.checkpoint import check_checkpoint
    from pipeline.storage import resolve_fs

    try:
        check_checkpoint(cfg.checkpoint, weights=cfg.weights)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"checkpoint: {err}") from err
    import pyarrow.fs as pafs

    fs, path = resolve_fs(cfg.output)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise UsageError(f"output {cfg.output} is a file, not a folder")


def exit_status(summary: dict, allow_errors: bool = False) -> int:
    """0 when nothing failed (or `allow_errors`), else 1."""
    return EXIT_ITEM_ERRORS if summary.get("error") and not allow_errors else EXIT_OK


def _run_pipeline(cfg: UpscaleJobConfig, todo: list, results: list, total: int, already: int) -> Optional[float]:
    """Stream `todo` through decode -> upscale -> write, appending finished rows to `results`.
    Returns the steady rate: rows/s from the first finished batch to the last (startup excluded)."""
    import ray

    from pipeline import upscale_io as io

    num_gpus = cfg.num_gpus
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / cfg.batch_size)))
    ds = ds.map_batches(_arrow(io.decode_batch), batch_format="pyarrow", batch_size=IO_BATCH)
    stage_kwargs = {**cfg.upscaler_options(), "fail_after": cfg.fail_after}
    ds = ds.map_batches(_make_upscale_stage(), fn_constructor_args=(cfg.checkpoint,), fn_constructor_kwargs=stage_kwargs,
                        batch_format="pyarrow", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.pool_size), num_gpus=num_gpus,
                        num_cpus=cfg.cpus_per_actor)
    ds = ds.map_batches(_arrow(io.write_batch, output_root=cfg.output), batch_format="pyarrow", batch_size=IO_BATCH)
    start = last = time.perf_counter()
    first = None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        results.extend(batch.to_pylist())
        now = time.perf_counter()
        first = first or (now, len(results))
        if now - last > PROGRESS_EVERY_S or len(results) == len(todo):
            errors = sum(r["status"] == io.ERROR for r in results)
            print(f"[upscale] {already + len(results)}/{total} done ({errors} errors this run), "
                  f"{len(results) / (now - start):.2f} img/s", file=sys.stderr, flush=True)
            last = now
    if first is None or len(results) < STEADY_MIN_FACTOR * first[1]:
        return None  # too few batches after the first one to say
    return round((len(results) - first[1]) / (time.perf_counter() - first[0]), 3)


# ---- command line ---------------------------------------------------------------------------
def add_upscale_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `python -m jobs.upscale` and `flowsr upscale` (Real-ESRGAN-style names
    are accepted as aliases)."""
    d = {f.name: f.default for f in dataclasses.fields(UpscaleJobConfig)}
    p.add_argument("--checkpoint", "-m", required=True, help="FlowSR checkpoint directory")
    p.add_argument("--scale", "-s", "--outscale", type=float, default=d["scale"], help=f"output / input size, in (0, {MAX_SCALE:g}]")
    p.add_argument("--steps", type=int, default=d["steps"], help="Euler steps (1 = one-step SR)")
    p.add_argument("--tile", "-t", type=int, default=d["tile"], help="tile size in output pixels (0: none)")
    p.add_argument("--tile-overlap", "--tile_pad", type=int, default=d["tile_overlap"], help="tile overlap, output pixels")
    p.add_argument("--vae-tile", type=int, default=d["vae_tile"], help="VAE tile size in output pixels (0: none)")
    p.add_argument("--color-fix", choices=("wavelet", "adain", "none"), default=d["color_fix"])
    p.add_argument("--format", "--ext", choices=("same", "png", "jpg", "webp"), default=d["format"])
    p.add_argument("--suffix", default=d["suffix"], help="appended to each output file's stem")
    p.add_argument("--path-column", default=d["path_column"], help="path column of a Parquet input")
    p.add_argument("--manifest", default=None, help="manifest Parquet (default OUT/manifest.parquet)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--tile-batch", type=int, default=d["tile_batch"])
    p.add_argument("--bucket", type=int, default=d["bucket"], help="size bucket for dense batches, output pixels")
    p.add_argument("--pool-size", type=int, default=d["pool_size"], help="upscaler actors")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=d["cpus_per_actor"])
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--fp32", dest="dtype", action="store_const", const="fp32", help="same as --dtype fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--compile-cache-dir", default=None, help="inductor cache shared by the actors")
    p.add_argument("--pretrained", default=None, help="override the SD base model location")
    p.add_argument("--weights", choices=("student", "target"), default=d["weights"])
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help="input pixel cap, checked from the header before decoding (per-item error above it)")
    p.add_argument("--max-output-pixels", type=int, default=d["max_output_pixels"], help="output pixel cap")
    p.add_argument("--max-bytes", type=int, default=d["max_bytes"], help="input file size cap")
    p.add_argument("--glob", action="store_true", default=None,
                   help="read the input as a glob even if a file or folder of that name exists")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even when some inputs failed")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    add_ray_args(p)


class ConfigError(UsageError):
    """An option value the config refuses."""


def config_from_args(args: argparse.Namespace) -> UpscaleJobConfig:
    names = {f.name for f in dataclasses.fields(UpscaleJobConfig)}
    try:
        return UpscaleJobConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as err:
        raise ConfigError(str(err)) from err


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job; the exit status (0, 1 when inputs failed, 2 for a usage mistake, told in one line)."""
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return EXIT_OK
        summary = upscale_corpus(cfg)
    except (UsageError, ConfigError) as err:
        print(f"flowsr upscale: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return exit_status(summary, cfg.allow_errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", required=True, help="folder, glob, file, URI or Parquet file with a path column")
    p.add_argument("--output", "-o", required=True, help="output folder (mirrors the input names)")
    add_upscale_options(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
