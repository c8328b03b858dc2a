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
import sys
import time
from typing import Optional

import pyarrow.fs as pafs

from jobs.common import EXIT_OK, add_allow_errors_arg, add_ray_args, exit_status, fit_actor_cpus, job_main, using_ray
from pipeline.actors import gpu_pool_size
from pipeline.storage import is_local
from pipeline import inputs
from pipeline import output as out
from pipeline.storage import resolve_fs
from pipeline.upscale_config import BACKENDS, MAX_SCALE, UpscaleJobConfig


class UsageError(ValueError):
    """A mistake in the command line, the input or the checkpoint: one line, exit status 2."""


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



def upscale_corpus(cfg: UpscaleJobConfig) -> dict:
    """Upscale every input once; returns a summary (counts, seconds, images/s, manifest path).

    Connects to the cluster first (a dead `--address` fails in one line before OUT is touched),
    then holds OUT's lease and checks its run record (`pipeline.output`): a concurrent run or a
    rerun with another checkpoint / settings is refused with one line (OutputError)."""
    if cfg.scale is None:
        cfg = resolve_model(cfg)
    check_before_run(cfg)  # before OUT or the corpus is touched
    try:
        exclude = [cfg.output]  # when it lies inside the input (a folder or a bucket prefix)
        listing = inputs.list_input_groups(cfg.input, path_column=cfg.path_column, glob=cfg.glob, exclude=exclude)
    except (FileNotFoundError, NotADirectoryError, KeyError) as err:
        raise UsageError(f"input {cfg.input}: {err}") from err
    with using_ray(cfg.address, only_a_cluster=True):  # a dead cluster: one line, OUT untouched
        # clear_recursive=False: OUT holds an image per input; the job clears its own folders itself
        with out.open_output(cfg.output, cfg.record(), overwrite=cfg.overwrite, remove_results=False,
                             clear_recursive=False):
            return _upscale_corpus(cfg, listing)


def _upscale_corpus(cfg: UpscaleJobConfig, listing: inputs.Listing) -> dict:
    """Upscale every input of `listing` once (OUT's lease held; `pipeline.upscale_flow`); returns
    the summary. The manifest is consolidated from its parts only when every input has its row:
    a run that stops early (a signal, a full disk) leaves its parts and no manifest, and the next
    run redoes the rest."""
    from pipeline import upscale_flow as flow

    start = time.perf_counter()
    listed = flow.start_run(cfg, listing)
    steady = None
    if listed.paths:
        with using_ray(cfg.address):
            pending, mixed = flow.probe_listing(cfg, listed)
            if pending:
                steady = _upscale_pending(cfg, pending, sort=mixed)
    counts = flow.finish_run(cfg)
    seconds = time.perf_counter() - start
    summary = {"total": sum(counts.values()), **counts, "seconds": round(seconds, 3),
               "images_per_s": round(counts[inputs.OK] / seconds, 3) if seconds else 0.0,
               "steady_images_per_s": steady, "manifest": flow.manifest_uri(cfg)}
    print(f"[upscale] {json.dumps(summary)}", file=sys.stderr, flush=True)
    return summary


def _upscale_pending(cfg: UpscaleJobConfig, pending: list, sort: bool) -> Optional[float]:
    """`pipeline.upscale_flow.upscale_pending` on this cluster: GPUs per actor (1 when the cluster
    has GPUs, unless given), the pool size and each actor's CPUs."""
    import ray

    from pipeline import upscale_flow as flow

    cluster = ray.cluster_resources()
    num_gpus = cfg.num_gpus
    if num_gpus is None:
        num_gpus = 1 if cluster.get("GPU", 0) > 0 else 0
    cfg = dataclasses.replace(cfg, pool_size=gpu_pool_size(cfg.pool_size, num_gpus, cluster))
    return flow.upscale_pending(cfg, pending, sort=sort, num_gpus=num_gpus,
                                num_cpus=actor_cpus(cfg, cluster.get("CPU", 0)))


def check_before_run(cfg: UpscaleJobConfig) -> None:
    """Usage mistakes found before the corpus is touched, as UsageError: a missing or unreadable
    checkpoint (config and weights), an output folder that is a file."""
    from flowsr.checkpoint import check_checkpoint
    from pipeline.sr_models import FLOWSR, ONNXRUNTIME, backend_for, check_onnx_options, model_kind

    try:
        if backend_for(cfg.checkpoint, cfg.backend) == ONNXRUNTIME:
            check_onnx_options(cfg.steps, cfg.dtype, cfg.compile)
        if model_kind(cfg.checkpoint) == FLOWSR and is_local(cfg.checkpoint):  # weights files: describe()
            check_checkpoint(cfg.checkpoint, weights=cfg.weights)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"model: {err}") from err
    fs, path = resolve_fs(cfg.output)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise UsageError(f"output {cfg.output} is a file, not a folder")


def actor_cpus(cfg: UpscaleJobConfig, cluster_cpus: float) -> float:
    """Logical CPUs per upscaler actor (`jobs.common.fit_actor_cpus`): a 1-CPU local Ray hung, the
    actor holding the CPU that decoding needed."""
    actors = 1 if cfg.pool_size is None else cfg.pool_size  # None: sized by GPUs, 1 on a CPU cluster
    return fit_actor_cpus(cfg.cpus_per_actor, actors, cluster_cpus, "upscale")


# ---- command line ---------------------------------------------------------------------------
ALPHA_UPSAMPLERS = ("bicubic", "realesrgan")


def add_options(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Run the job; returns the exit status: 0, or 1 when inputs failed (`--allow-errors`: 0).
    Config errors, a model argument that names nothing runnable, a checkpoint or input that is
    not there, an output leased by another run or holding other settings' results: a ValueError,
    one line on stderr and exit 2 (`run_job`)."""
    cfg = resolve_model(config_from_args(args))
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return EXIT_OK
    summary = upscale_corpus(cfg)
    return exit_status(summary["error"], cfg.allow_errors)


def main(argv=None) -> int:
    return job_main("upscale", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
