"""Training throughput through the Ray trainer (`jobs.train.train`, data decoding included).

CPU (default): img/s of one stage-1 run with 1 and with 2 Ray Train CPU workers at the same
global batch, and the scaling efficiency img/s(2 workers) / (2 x img/s(1 worker)); a 1-worker
run with as many torch threads as the 2 workers have together is printed for reference.

GPU (--gpu, needs CUDA): stage-1 and stage-2 step time and peak memory at SD 2.1-base shapes
(random weights, `flowsr.tiny.build_random_sd21`), 512^2, bf16, batch 8, one Ray Train GPU
worker, with every loss term of the paper preset: LPIPS-VGG (random backbone, pnet_rand=True —
ImageNet weights cannot be downloaded here) and a random ViT-L/14 CLIP for the IQA loss.

    python benchmarks/bench_train.py [--preset pixel-small|tiny] [--batch 8] [--steps 12]
    python benchmarks/bench_train.py --gpu [--batch 8] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

WARMUP_STEPS = 3  # steps left out of every median (first batches, allocator warm-up)
STAGE1_GOAL, STAGE2_GOAL = 35.0, 12.0  # img/s per H200 (issue 5)
ANCHOR_STAGE1_S = 0.39  # s per stage-1 step at batch 8 without LPIPS, one H200 (docs/DESIGN.md)


def write_pairs(directory: str, n: int, hr_size: int, scale: int = 4, seed: int = 0) -> str:
    """`n` smooth random HR / LR pairs (PNG rows of the pair schema) in one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.schema import encode_png
    from pipeline.shards import conform_pairs

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        coarse = rng.integers(0, 256, (hr_size // 16, hr_size // 16, 3), dtype=np.uint8)
        hr = np.asarray(Image.fromarray(coarse).resize((hr_size, hr_size), Image.BICUBIC))
        lr = np.asarray(Image.fromarray(hr).resize((hr_size // scale,) * 2, Image.BICUBIC))
        rows.append({"sample_id": f"bench-{i:06d}", "source_uri": "random://", "hr": encode_png(hr),
                     "lr": encode_png(lr), "scale": scale, "seed": seed, "hr_caption": "a sharp photo",
                     "lr_caption": "a blurry photo"})
    os.makedirs(directory, exist_ok=True)
    pq.write_table(conform_pairs(pa.Table.from_pylist(rows)), os.path.join(directory, "part-00000.parquet"))
    return directory


def build_random_clip(directory: str, arch: str = "ViT-L-14", seed: int = 0) -> str:
    """An open_clip `local-dir:` model with `arch`'s shapes and random weights (benchmarks only)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model_cfg = open_clip.get_model_config(arch)
    model = open_clip.CLIP(**model_cfg)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    (root / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                   "std": [0.26862954, 0.26130258, 0.27577711]}}))
    return f"local-dir:{root}"


def summarise(csv_path: str) -> dict:
    """Median img/s and step time after the warm-up steps, and peak GPU memory, from a metrics CSV."""
    from flowsr.metrics_log import read_csv

    rows = read_csv(csv_path)
    steady = rows[WARMUP_STEPS:] or rows
    ips = statistics.median(float(r["img_per_s"]) for r in steady)
    mem = [float(r["gpu_mem_gb"]) for r in rows if r.get("gpu_mem_gb")]
    return {"img_per_s": ips, "steps": len(rows), "peak_gb": max(mem) if mem else float("nan")}


def run(cfg, data: str, root: str, name: str, stage="1") -> dict:
    import ray.data

    from jobs.train import train

    ray.data.DataContext.get_current().enable_progress_bars = False

    out = train(cfg, data, storage_path=root, name=name, stage=stage)
    return {s: summarise(out[f"stage{s}_metrics_csv"]) for s in (1, 2) if out.get(f"stage{s}_metrics_csv")}


# ---- CPU: data-parallel scaling ----------------------------------------------------------------
def cpu_scaling(preset: str, batch: int, steps: int) -> None:
    import ray

    from flowsr.config import apply_overrides, resolve
    from flowsr.tiny import tiny_overrides

    cores = os.cpu_count() or 2
    # logical headroom for Ray Data's read tasks next to the training workers; worker logs stay out
    ray.init(num_cpus=cores + 2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        base = resolve(preset, tiny_overrides(os.path.join(root, "models")) if preset == "tiny" else [])
        data = write_pairs(os.path.join(root, "data"), batch * steps, base.data.patch_size)
        print(f"preset {preset}, stage 1, global batch {batch}, {steps} steps, {base.data.patch_size}px, "
              f"{cores} cores; median over steps > {WARMUP_STEPS}", flush=True)
        results = {}
        for workers, threads in ((1, 1), (2, 1), (1, 2)):
            cfg = apply_overrides(base, [f"optim.batch_size={batch}", f"optim.stage1_steps={steps}",
                                         f"train.num_workers={workers}", f"train.cpus_per_worker={threads}",
                                         f"train.checkpoint_every={steps}", "train.use_gpu=false"])
            r = run(cfg, data, root, f"w{workers}t{threads}")[1]
            results[workers, threads] = r["img_per_s"]
            print(f"  {workers} worker(s) x {threads} thread(s): {r['img_per_s']:7.2f} img/s "
                  f"({batch / r['img_per_s'] * 1e3:7.1f} ms/step)", flush=True)
        eff = results[2, 1] / (2 * results[1, 1])
        print(f"scaling efficiency 1 -> 2 workers (1 thread each): {eff:.2f} "
              f"(speed-up {results[2, 1] / results[1, 1]:.2f}x; 1 worker x 2 threads: "
              f"{results[1, 2] / results[1, 1]:.2f}x)")


# ---- GPU: SD 2.1-base shapes -------------------------------------------------------------------
def sd21_benchmark(root: str, *, batch: int = 8, steps: int = 20, size: int = 512, use_gpu: bool = True,
                   model_dir: str = "", clip: str = "") -> dict:
    """Both stages at SD 2.1-base shapes on one worker; `model_dir` / `clip` reuse built models."""
    from flowsr.config import apply_overrides, preset
    from flowsr.tiny import build_random_sd21

    model_dir = model_dir or build_random_sd21(os.path.join(root, "sd21"))
    clip = clip or build_random_clip(os.path.join(root, "clip"))
    data = write_pairs(os.path.join(root, "data"), batch * 8, size)
    cfg = apply_overrides(preset("paper"), [
        f"model.pretrained={model_dir}", f"loss.clip_arch={clip}", "loss.clip_pretrained=",
        "loss.lpips_pretrained=false", f"data.patch_size={size}", f"optim.batch_size={batch}",
        f"optim.stage1_steps={steps}", f"optim.stage2_steps={steps}", f"train.checkpoint_every={steps}",
        "train.num_workers=1", f"train.use_gpu={json.dumps(use_gpu)}",
        f"train.mixed_precision={'bf16' if use_gpu else 'no'}"])
    return run(cfg, data, os.path.join(root, "runs"), "sd21", stage="all")


def gpu(batch: int, steps: int) -> None:
    import ray
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    ray.init(object_store_memory=4 << 30, include_dashboard=False, log_to_driver=False)
    print(f"{torch.cuda.get_device_name()}: SD 2.1-base shapes, random weights, bf16 autocast, {batch} x 512^2, "
          f"one Ray Train worker; LPIPS-VGG with a random backbone (pnet_rand=True: no ImageNet weights "
          f"offline), random ViT-L/14 CLIP; median over steps > {WARMUP_STEPS}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as root:
        res = sd21_benchmark(root, batch=batch, steps=steps)
    for stage, goal in ((1, STAGE1_GOAL), (2, STAGE2_GOAL)):
        r = res[stage]
        print(f"  stage {stage}: {batch / r['img_per_s']:.3f} s/step, {r['img_per_s']:.1f} img/s "
              f"(goal >= {goal:.0f}), peak {r['peak_gb']:.1f} GiB")
    print(f"  anchor: stage 1 {ANCHOR_STAGE1_S} s/step at batch 8 without LPIPS")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="SD 2.1-base shapes on CUDA")
    ap.add_argument("--preset", default="pixel-small", choices=("pixel-small", "tiny"))
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 12 CPU, 20 GPU)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.gpu:
        gpu(args.batch, args.steps or 20)
    else:
        cpu_scaling(args.preset, args.batch, args.steps or 12)


if __name__ == "__main__":
    main()
