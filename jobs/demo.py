"""The embedded demo: bundled images -> degraded pairs -> stage 1 + stage 2 -> upscale -> report.

Runs on a local Ray with only what the project and its packages ship: scikit-image's sample
images, template captions, and a small pixel-space UNet trained from scratch (preset
`pixel-small`). Prints the path of an HTML report at the end.

The pairs are bicubic x4 by default: in the demo's few minutes on 2 cores the small net gains a
steady +0.3 dB over bicubic on those, while on Real-ESRGAN's far heavier random degradations
(the paper's data, `--degradation realesrgan`) it lands within +-0.2 dB of bicubic, on one side
or the other depending on the held-out draws.

    flowsr demo [--out outputs/demo] [--stage1-steps N] [--stage2-steps N] [--degradation bicubic|realesrgan]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from flowsr.config import apply_overrides, preset
from pipeline.evaluation import EvalConfig
from pipeline.report import write_demo_report

# scikit-image's bundled samples: held-out images are never seen in training
TRAIN_IMAGES = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
                "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
HELDOUT_IMAGES = ("chelsea", "coffee")


def ray_logs_dir() -> str:
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:  # a Ray without that internal: its documented default
        return "/tmp/ray/session_latest/logs"


def phase(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def write_samples(names: Sequence[str], directory: str) -> List[str]:
    """Save scikit-image samples as PNG files (grey ones stay grey: the data stage converts them)."""
    import skimage.data
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in names:
        path = os.path.join(directory, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(path)
        paths.append(path)
    return paths


def heldout_pairs(shards: str):
    """(ids, [(lr, hr)]) of the Parquet shards, decoded to uint8 RGB."""
    import pyarrow.parquet as pq

    from pipeline.schema import decode_png

    table = pq.read_table(shards, columns=["sample_id", "hr", "lr"]).sort_by("sample_id").to_pylist()
    return [r["sample_id"] for r in table], [(decode_png(r["lr"]), decode_png(r["hr"])) for r in table]


DEGRADATION_TEXT = {"bicubic": "bicubic x4 downsampling",
                    "realesrgan": "Real-ESRGAN second-order degradations (x4)"}


STAGE1_STEPS, STAGE2_STEPS = 400, 100  # about 6 minutes of training on 2 cores
CROPS_PER_IMAGE = 64  # random 64-px training crops per image, each with its own degradation
SUMMARY_FILE = "summary.json"  # in the demo's output folder: what `demo()` returns
HELDOUT_TILES = 64  # 128-px grid tiles per held-out image: all that fit (6 of chelsea, 12 of coffee)


def demo(out: str, **options) -> Dict:
    """The embedded end-to-end run (see `_demo` for the options) on a local Ray, which it shuts
    down again when it started it."""
    from jobs.common import using_ray

    cores = max(2, os.cpu_count() or 2)
    # the training workers take every core (torch threads = cpus_per_worker); one logical CPU
    # more lets Ray Data's short read tasks run beside them instead of waiting for a free CPU
    with using_ray(None, num_cpus=cores + 1, object_store_memory=1 << 30):
        return _demo(out, **options)


def _demo(out: str, *, stage1_steps: int = STAGE1_STEPS, stage2_steps: int = STAGE2_STEPS, patch_size: int = 64,
          crops_per_image: int = CROPS_PER_IMAGE, heldout_tiles: int = HELDOUT_TILES, num_workers: int = 1,
          seed: int = 0, degradation: str = "bicubic") -> Dict:
    from jobs.evaluate import evaluate
    from jobs.prepare_data import SHARDS_DIR, PrepareConfig, prepare
    from jobs.train import train
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    timings: Dict[str, float] = {}
    cores = max(2, os.cpu_count() or 2)
    print(f"full logs of every Ray process: {ray_logs_dir()}", flush=True)

    t0 = phase(f"1/5 prepare pairs ({DEGRADATION_TEXT[degradation]}, template captions)")
    write_samples(TRAIN_IMAGES, os.path.join(out, "images", "train"))
    write_samples(HELDOUT_IMAGES, os.path.join(out, "images", "heldout"))
    common = dict(patch_size=patch_size, scale=4, seed=seed, captioner="template", degradation=degradation)
    train_summary = prepare(PrepareConfig(input=os.path.join(out, "images", "train"),
                                          output=os.path.join(out, "pairs", "train"),
                                          crops_per_image=crops_per_image, **common))
    prepare(PrepareConfig(input=os.path.join(out, "images", "heldout"), output=os.path.join(out, "pairs", "heldout"),
                          crops_per_image=heldout_tiles, crop_mode="grid", **{**common, "patch_size": 128}))
    print(json.dumps({k: v for k, v in train_summary.items() if isinstance(v, (int, float, str))}), flush=True)
    timings["prepare"] = time.perf_counter() - t0

    t0 = phase(f"2/5 train stage 1 ({stage1_steps} steps) then stage 2 ({stage2_steps} steps) on Ray Train")
    cfg = apply_overrides(preset("pixel-small"), [
        f"optim.stage1_steps={stage1_steps}", f"optim.stage2_steps={stage2_steps}",
        f"data.patch_size={patch_size}", f"train.num_workers={num_workers}", "train.use_gpu=false",
        f"train.cpus_per_worker={max(1, cores // num_workers)}",
        f"train.checkpoint_every={max(stage1_steps, stage2_steps)}", f"train.val_every={max(stage1_steps, stage2_steps)}",
        f"train.seed={seed}"])
    train_shards = os.path.join(out, "pairs", "train", SHARDS_DIR)
    heldout_shards = os.path.join(out, "pairs", "heldout", SHARDS_DIR)
    result = train(cfg, train_shards, storage_path=os.path.join(out, "runs"), name="demo", stage="all",
                   val_uri=heldout_shards)
    timings["train"] = time.perf_counter() - t0

    t0 = phase("3/5 evaluate held-out crops: bicubic vs 1 and 4 steps")
    eval_dir = os.path.join(out, "evaluation")
    summary = evaluate(EvalConfig(data=heldout_shards, out=eval_dir,
                                  checkpoint=result["checkpoint"], steps=(1, 4), metrics=(),
                                  dataset_name="demo held-out", report_images=4, crop_size=96))
    timings["evaluate"] = time.perf_counter() - t0

    t0 = phase("4/5 bulk-upscale the held-out LR images (Ray Data, 1 step)")
    ids, pairs = heldout_pairs(heldout_shards)
    lr_dir = os.path.join(out, "images", "heldout_lr")
    os.makedirs(lr_dir, exist_ok=True)
    from PIL import Image

    for sid, (lr, _) in zip(ids, pairs):
        Image.fromarray(lr).save(os.path.join(lr_dir, f"{sid}.png"))
    up = upscale_corpus(UpscaleJobConfig(input=lr_dir, output=os.path.join(out, "upscaled"),
                                         checkpoint=result["checkpoint"], steps=1, tile=0, color_fix="none"))
    timings["upscale"] = time.perf_counter() - t0

    t0 = phase("5/5 report")
    data_text = (f"A small pixel-space FlowSR model trained on a local Ray from scikit-image's sample images with\n"
                 f"{DEGRADATION_TEXT[degradation]}, evaluated on held-out images ({', '.join(HELDOUT_IMAGES)}).")
    report = write_demo_report(out, evaluation=summary, eval_dir=eval_dir, curves={
        "stage 1": result.get("stage1_loss_curve"), "stage 2": result.get("stage2_loss_curve")},
        upscaled={**up, "output": os.path.join(out, "upscaled")}, timings=timings, data_text=data_text)
    mean = summary["mean"]
    gain = mean["1-step"]["psnr"] - mean["bicubic"]["psnr"]
    print(f"held-out PSNR: bicubic {mean['bicubic']['psnr']:.2f} dB, 1 step {mean['1-step']['psnr']:.2f} dB "
          f"({gain:+.2f}), 4 steps {mean['4-step']['psnr']:.2f} dB", flush=True)
    result = {"report": report, "psnr_gain_1step": gain, "mean": mean, "checkpoint": result["checkpoint"],
              "upscale": up, "timings": timings, "heldout_pairs": len(ids)}
    with open(os.path.join(out, SUMMARY_FILE), "w") as f:  # the figures, for scripts and CI
        json.dump(result, f, indent=1, default=float)
    sys.stderr.flush()  # the jobs' own stderr lines (the upscale summary) before the last line
    print(f"report: {report}", flush=True)
    return result


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="output folder (report, pairs, runs, upscaled)")
    p.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS, help="stage-1 (flow) training steps")
    p.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS, help="stage-2 (consistency) training steps")
    p.add_argument("--crops-per-image", type=int, default=CROPS_PER_IMAGE,
                   help="random training crops per bundled image, each with its own degradation")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the evaluation")
    p.add_argument("--degradation", choices=tuple(DEGRADATION_TEXT), default="bicubic",
                   help="how the LR images are made (realesrgan: the paper's data, far harder)")


def check_options(args) -> None:
    """Demo options that cannot run, as ValueError (one line), before Ray or the output is touched."""
    if args.num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {args.num_workers}")
    if min(args.stage1_steps, args.stage2_steps) < 1:
        raise ValueError(f"--stage1-steps and --stage2-steps must be at least 1, got "
                         f"{args.stage1_steps} and {args.stage2_steps}")
    if args.crops_per_image < 1:
        raise ValueError(f"--crops-per-image must be at least 1, got {args.crops_per_image}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder")


def run(args) -> int:
    from jobs.common import filter_native_stderr, quiet_console, setup_logging

    check_options(args)
    setup_logging()
    filter_native_stderr()  # Ray's C++ lines ("core_worker.cc ... E") bypass Python's sys.stderr
    with quiet_console():  # Ray's known noise off the console; every log stays in the Ray session's folder
        demo(args.out, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
             crops_per_image=args.crops_per_image, num_workers=args.num_workers, seed=args.seed,
             degradation=args.degradation)
    return 0


def main(argv=None) -> int:
    from jobs.common import job_main

    return job_main("demo", sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
