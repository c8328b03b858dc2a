"""Bulk-upscaling throughput at 512^2 output: the whole Ray Data job (files in, files out) against a
plain per-image loop (read, resize, VAE encode, UNet, VAE decode, write; batch 1, eager), in one run.

CPU (default): tiny SD shapes (flowsr.tiny), 128^2 -> 512^2 PNGs.
GPU (--sd21, needs CUDA): SD 2.1-base shapes with random weights (flowsr.tiny.build_random_sd21,
LoRA r32), bf16; then the peak GPU memory of one 4096^2 output with 512^2 tiles.

    python benchmarks/bench_upscale.py [--sd21] [--images N] [--batch-size B] [--pool-size P]
                                       [--compile] [--no-loop] [--no-4k]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from flowsr.backbones import build_backbone
from flowsr.checkpoint import load_for_inference
from flowsr.config import apply_overrides, preset
from flowsr.sample import resize_to, super_resolve
from flowsr.upscaler import Upscaler, array_to_tensor, tensor_to_array
from flowsr.tiny import build_random_sd21, tiny_config

LR_SIZE, SCALE = 128, 4  # 512^2 out


def make_checkpoint(root: str, sd21: bool) -> str:
    """A FlowSR inference checkpoint (config.json + student LoRA) on random SD-shaped weights."""
    if sd21:
        cfg = apply_overrides(preset("paper"), [f"model.pretrained={build_random_sd21(os.path.join(root, 'sd21'))}"])
    else:
        cfg = tiny_config(os.path.join(root, "tiny"))
    ckpt = os.path.join(root, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    cfg.save(os.path.join(ckpt, "config.json"))
    build_backbone(cfg.model).save_trainable(os.path.join(ckpt, "student"))
    return ckpt


def make_inputs(directory: str, n: int, size: int = LR_SIZE) -> list:
    """`n` LR PNGs (`size`^2 crops of skimage's natural images); their paths."""
    from PIL import Image
    from skimage import data

    os.makedirs(directory, exist_ok=True)
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        y, x = (i * 37) % (src.shape[0] - size), (i * 53) % (src.shape[1] - size)
        path = os.path.join(directory, f"img{i:05d}.png")
        Image.fromarray(src[y:y + size, x:x + size]).save(path)
        paths.append(path)
    return paths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(one, paths: list, device: torch.device) -> float:
    """images/s of `one(path)` over `paths`, after one warm-up image."""
    one(paths[0])
    _sync(device)
    start = time.perf_counter()
    for path in paths:
        one(path)
    _sync(device)
    return len(paths) / (time.perf_counter() - start)


@torch.no_grad()
def plain_loop(ckpt: str, paths: list, out_dir: str, device: torch.device, dtype: torch.dtype) -> float:
    """images/s of the eager per-image loop (model load and one warm-up image excluded)."""
    from PIL import Image

    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU budget of the job's one actor (Ray gives it 1 thread)
    backbone, _ = load_for_inference(ckpt, device=device)
    if dtype != torch.float32:
        backbone = backbone.to(dtype)
    os.makedirs(out_dir, exist_ok=True)

    def one(path):
        lr = array_to_tensor(np.asarray(Image.open(path).convert("RGB")), device).to(dtype)
        sr = super_resolve(backbone, resize_to(lr, (LR_SIZE * SCALE, LR_SIZE * SCALE)))
        Image.fromarray(tensor_to_array(sr[0])).save(os.path.join(out_dir, os.path.basename(path)))

    return images_per_second(one, paths, device)


def whole_job(ckpt: str, in_dir: str, out_dir: str, args) -> dict:
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    cfg = UpscaleJobConfig(input=in_dir, output=out_dir, checkpoint=ckpt, scale=SCALE, tile=512, vae_tile=512,
                           batch_size=args.batch_size, tile_batch=args.batch_size, pool_size=args.pool_size,
                           compile=args.compile, format="png")
    return upscale_corpus(cfg)


@torch.no_grad()
def peak_memory_4k(ckpt: str) -> tuple:
    """(peak GiB, seconds) of one 1024^2 -> 4096^2 upscale with 512^2 tiles, bf16."""
    upscaler = Upscaler(ckpt, scale=4, tile=512, tile_overlap=64, vae_tile=512, tile_batch=8)
    image = (np.random.default_rng(0).random((1024, 1024, 3)) * 255).astype(np.uint8)
    upscaler.upscale_images([image[:256, :256]])  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    (out,), _ = upscaler.upscale_images([image])
    torch.cuda.synchronize()
    assert out.shape == (4096, 4096, 3)
    return torch.cuda.max_memory_allocated() / 2**30, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd21", action="store_true", help="SD 2.1-base shapes on CUDA")
    ap.add_argument("--images", type=int, default=None, help="corpus size (default 24 on CPU, 512 on GPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per upscaler call (default 4 CPU, 16 GPU)")
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile in the job's upscalers")
    ap.add_argument("--no-loop", action="store_true", help="skip the plain loop")
    ap.add_argument("--no-4k", action="store_true", help="skip the 4096^2 memory measurement")
    args = ap.parse_args(argv)
    if args.sd21 and not torch.cuda.is_available():
        raise SystemExit("--sd21 needs a CUDA device")
    gpu = args.sd21
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    args.images = args.images or (512 if gpu else 24)
    args.batch_size = args.batch_size or (16 if gpu else 4)
    from jobs.common import init_ray

    with tempfile.TemporaryDirectory() as root:
        ckpt = make_checkpoint(root, gpu)
        paths = make_inputs(os.path.join(root, "in"), args.images)
        shapes = "SD 2.1-base shapes, random weights, bf16" if gpu else "tiny SD shapes, fp32, CPU"
        print(f"{shapes}; {args.images} images {LR_SIZE}^2 -> {LR_SIZE * SCALE}^2 PNG", flush=True)
        if not args.no_loop:
            rate = plain_loop(ckpt, paths, os.path.join(root, "loop_out"), device, dtype)
            print(f"plain per-image loop (batch 1, eager, LoRA unmerged, no colour fix"
                  f"{', 1 thread' if not gpu else ''}): {rate:8.2f} img/s", flush=True)
        start = time.perf_counter()
        init_ray(None, object_store_memory=None if gpu else 1 << 30)
        ray_s = time.perf_counter() - start
        s = whole_job(ckpt, os.path.join(root, "in"), os.path.join(root, "job_out"), args)
        print(f"whole Ray Data job (batch {args.batch_size}, pool {args.pool_size}, compile {args.compile}, "
              f"wavelet fix): {s['images_per_s']:8.2f} img/s over {s['seconds']:.1f} s incl. listing, probing and "
              f"actor start; steady {s['steady_images_per_s']} img/s (ray.init {ray_s:.1f} s not counted); "
              f"ok {s['ok']}, errors {s['error']}", flush=True)
        if gpu and not args.no_4k:
            import ray

            ray.shutdown()  # free the actors' GPU memory first
            peak, seconds = peak_memory_4k(ckpt)
            print(f"4096^2 output (1024^2 in, 512^2 tiles, overlap 64, bf16): peak GPU memory {peak:.2f} GiB, "
                  f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
