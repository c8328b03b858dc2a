"""Step and inference timings of the method core.

CPU (default): tiny SD backbone and the pixel backbone.
GPU (--sd21, needs CUDA): SD 2.1-base shapes with random weights, bf16, 512^2, batch 8.

    python benchmarks/bench_steps.py [--sd21] [--batch 8] [--iters 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from flowsr.build import build_stage1, build_stage2, make_optimizer
from flowsr.config import apply_overrides, preset
from flowsr.sample import super_resolve
from flowsr.schedules import make_pair_sampler
from flowsr.tiny import build_random_sd21, tiny_config
from flowsr.train_step import stage1_step, stage2_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def batch_of(n, size, device):
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
    return {"hr": hr, "lr": hr.flip(-1), "hr_caption": ["a sharp photo"] * n, "lr_caption": ["a blurry photo"] * n}


def bench(name, cfg, device, batch_size, size, iters):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    batch = batch_of(batch_size, size, device)
    s1 = build_stage1(cfg, device)
    opt = make_optimizer(s1.student.trainable_parameters(), cfg.optim.lr, cfg)
    t1 = timeit(lambda: stage1_step(batch, s1, opt, cfg, g), device, iters)
    mem1 = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    with tempfile.TemporaryDirectory() as d:
        s1.student.save_trainable(d)
        del s1, opt
        s2 = build_stage2(cfg, device, init_from=d)
    opts = (make_optimizer(s2.student.trainable_parameters(), cfg.optim.lr, cfg),
            make_optimizer(s2.disc.parameters(), cfg.optim.disc_lr, cfg) if s2.disc is not None else None)
    sampler = make_pair_sampler(cfg.schedule.sampler, n_fast=cfg.schedule.n_fast, n_slow=cfg.schedule.n_slow)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t2 = timeit(lambda: stage2_step(batch, s2, opts, cfg, sampler, g), device, iters)
    mem2 = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    student = s2.student
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    with amp:
        t_inf = timeit(lambda: super_resolve(student, batch["lr"], steps=1), device, iters)
    print(f"{name:28s} batch {batch_size} {size}px | stage-1 step {t1 * 1e3:8.1f} ms ({batch_size / t1:6.1f} img/s, "
          f"peak {mem1:.1f} GiB) | stage-2 step {t2 * 1e3:8.1f} ms ({batch_size / t2:6.1f} img/s, peak {mem2:.1f} GiB) "
          f"| 1-step SR {t_inf * 1e3:7.1f} ms ({batch_size / t_inf:6.1f} img/s)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd21", action="store_true", help="SD 2.1-base shapes on CUDA")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--lpips", action="store_true", help="include LPIPS (random AlexNet backbone: no download)")
    args = ap.parse_args(argv)
    if args.sd21:
        if not torch.cuda.is_available():
            raise SystemExit("--sd21 needs a CUDA device")
        device = torch.device("cuda")
        with tempfile.TemporaryDirectory() as d:
            tiny = tiny_config(d)  # only for its tiny CLIP (the IQA loss at toy width)
            over = [f"model.pretrained={build_random_sd21(d + '/sd21')}", f"loss.clip_arch={tiny.loss.clip_arch}",
                    "loss.clip_pretrained=", "train.mixed_precision=\"bf16\"", "data.patch_size=512",
                    "loss.lpips_net=\"alex\"", "loss.lpips_pretrained=false"]
            if not args.lpips:
                over.append("loss.lambda_lpips=0")
            cfg = apply_overrides(preset("paper"), over)
            print("SD 2.1-base shapes, random weights, bf16; CLIP is a toy stand-in; "
                  f"LPIPS {'on (random AlexNet)' if args.lpips else 'off'}")
            bench("sd21-base", cfg, device, args.batch or 8, 512, args.iters)
        return
    device = torch.device("cpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        bench("tiny-sd (cpu)", tiny_config(d), device, args.batch or 4, 64, args.iters)
    bench("pixel-small (cpu)", preset("pixel-small"), device, args.batch or 8, 64, args.iters)


if __name__ == "__main__":
    main()
