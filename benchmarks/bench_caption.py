"""Captions/s of the qwen2vl caption backend: Qwen2-VL-2B shapes, random init, real tokenizer.

Each caption: one 512x512 image (seen at the stage's max_pixels, 448^2 = 256 image tokens),
the stage's HR prompt, exactly `--new-tokens` greedy tokens (min_new_tokens = max_new_tokens).
Batch 1 vs the stage's own batch size (CaptionConfig.batch_size), through
`Qwen2VLBackend.generate`, i.e. preprocessing + generate + decode, as in the stage.

    python benchmarks/bench_caption.py                     # 2B shapes, cuda + bf16 when available
    python benchmarks/bench_caption.py --size tiny         # quick CPU smoke run
    python benchmarks/bench_caption.py --batch-sizes 1,64,256 --static-cache   # GPU speed-ups

docs/DESIGN.md anchors (one H200, plain generate, bf16): 0.45 captions/s at batch 1, 25 at 64, 57 at 256.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.caption import PROMPTS, CaptionConfig, Qwen2VLBackend, resolve_device, resolve_dtype
from pipeline.qwen_offline import build_model, build_processor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2b", choices=["2b", "tiny"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list; default: 1 and the stage's batch size")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--iters", type=int, default=2, help="timed calls per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--static-cache", action="store_true",
                   help="static KV cache; transformers then torch.compiles the decoding step on GPU")
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2")
    return p.parse_args(argv)


def random_images(n, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_batch(backend, images, prompt, iters, warmup):
    """Seconds per `generate` call on `images` (mean over `iters` after `warmup` calls)."""
    for _ in range(warmup):
        backend.generate(images, prompt)
    sync(backend.model.device)
    start = time.perf_counter()
    for _ in range(iters):
        captions = backend.generate(images, prompt)
    sync(backend.model.device)
    assert len(captions) == len(images)
    return (time.perf_counter() - start) / iters


def main(argv=None):
    args = parse_args(argv)
    stage = CaptionConfig(backend="qwen2vl")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = CaptionConfig(backend="qwen2vl", model=f"random-init Qwen2-VL ({args.size})",
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        cache_implementation="static" if args.static_cache else None,
                        attn_implementation=args.attn_implementation)
    sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
             else [1, stage.batch_size])

    start = time.perf_counter()
    model = build_model(args.size, dtype=dtype, device=device)
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    backend = Qwen2VLBackend(model, build_processor(), cfg)
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    prompt = PROMPTS[cfg.prompt_version]["hr"]
    prompt_tokens = backend.inputs(random_images(1, args.image_size), prompt)["input_ids"].shape[1]
    print(f"Qwen2-VL {args.size} ({n_params:.2f} B params, random init) on {device}, {dtype}, "
          f"built in {time.perf_counter() - start:.1f} s; {args.image_size}^2 images, "
          f"{prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"cache={cfg.cache_implementation or 'dynamic'}; torch {torch.__version__}")
    if str(device).startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")

    for batch in sizes:
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = time_batch(backend, random_images(batch, args.image_size), prompt,
                             args.iters, args.warmup)
        memory = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                  if str(device).startswith("cuda") else "")
        tag = " (stage setting)" if batch == stage.batch_size else ""
        print(f"batch {batch:4d}{tag}: {batch / seconds:8.2f} captions/s  "
              f"({seconds:.3f} s per batch{memory})")


if __name__ == "__main__":
    main()
