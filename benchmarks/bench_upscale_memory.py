"""Peak memory of the upscaler actor against the output size: is it bounded by tiles?

Each output size runs in a fresh process that does what one upscaler actor of `jobs.upscale`
does for one image: the actor class (`jobs.upscale._make_upscale_stage()`) is built on a tiny
pixel-UNet checkpoint, then called on one decoded row (a pyarrow table, as Ray Data hands it
over). The process's peak RSS (`ru_maxrss`) is read before and after the call. The growth per
extra output megapixel between the smallest and the largest size is the figure DESIGN.md bounds
(<= 40 MB per output MP); it includes the output itself (3 B/pixel for 8-bit RGB) and the
copies the row hand-over makes.

    PYTHONPATH=. python benchmarks/bench_upscale_memory.py [--sizes 1 16 64] [--tile 128]

`--baseline DIR` also runs the same measurement with the code in DIR (e.g. an older checkout)
for the sizes in `--baseline-sizes`, for a before/after ratio in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SCALE = 4
CHILD = r"""
import json, resource, sys, time
import numpy as np, pyarrow as pa
from jobs.upscale import _make_upscale_stage

ckpt, side, tile, tile_batch, color_fix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
stage = _make_upscale_stage()(ckpt, scale=%(scale)d, tile=tile, tile_overlap=tile // 8, vae_tile=tile,
                              tile_batch=tile_batch, color_fix=color_fix, bucket=64)
y, x = np.mgrid[0:side, 0:side]
lr = np.stack([x % 256, y %% 256, (x + y) %% 256], -1).astype(np.uint8)
row = {"input": ["x.png"], "output": ["x.png"], "in_height": [side], "in_width": [side], "out_height": [0],
       "out_width": [0], "status": ["pending"], "error": [""], "pixels": [lr.tobytes()], "alpha": [b""],
       "dtype": ["uint8"], "height": [side], "width": [side], "channels": [3]}
table = pa.table({k: pa.array(v, type=pa.large_binary()) if k in ("pixels", "alpha") else v for k, v in row.items()})
del lr, row
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak_mb()
start = time.perf_counter()
out = stage(table)
seconds = time.perf_counter() - start
assert out.column("status").to_pylist() == ["pending"], out.column("error").to_pylist()
assert out.column("height").to_pylist() == [side * %(scale)d]
print(json.dumps({"before_mb": before, "peak_mb": peak_mb(), "seconds": seconds}))
""".replace("%(scale)d", str(SCALE)).replace("%%", "%")


def build_checkpoint(directory: str) -> str:
    import torch

    from flowsr.backbones import PixelBackbone
    from flowsr.config import apply_overrides, preset

    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[4]"])
    torch.manual_seed(0)
    backbone = PixelBackbone.from_config(cfg.model)
    cfg.save(os.path.join(directory, "config.json"))
    backbone.save_trainable(os.path.join(directory, "student"))
    return directory


def measure(code_dir: str, ckpt: str, megapixels: int, args) -> dict:
    side = int(round((megapixels * 1_000_000) ** 0.5 / SCALE / 8)) * 8
    env = {**os.environ, "PYTHONPATH": code_dir, "OMP_NUM_THREADS": str(args.threads), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", CHILD, ckpt, str(side), str(args.tile), str(args.tile_batch),
                             args.color_fix], env=env, cwd=code_dir, capture_output=True, text=True)
    if result.returncode != 0:
        return {"failed": result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]}
    figures = {**json.loads(result.stdout.strip().splitlines()[-1]), "out_mp": (side * SCALE) ** 2 / 1e6}
    print(f"  {code_dir}: {figures['out_mp']:.1f} MP out: peak RSS {figures['peak_mb']:.0f} MB "
          f"({figures['before_mb']:.0f} before the call), {figures['seconds']:.0f} s", flush=True)
    return figures


def report(label: str, rows: dict) -> None:
    print(f"{label}: {'out MP':>8} {'peak RSS MB':>12} {'before MB':>10} {'seconds':>8}")
    for mp, r in rows.items():
        if "failed" in r:
            print(f"{'':{len(label)}}  {mp:>8} failed: {r['failed']}")
        else:
            print(f"{'':{len(label)}}  {r['out_mp']:>8.1f} {r['peak_mb']:>12.0f} {r['before_mb']:>10.0f} {r['seconds']:>8.1f}")
    ok = [r for r in rows.values() if "failed" not in r]
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        growth = (hi["peak_mb"] - lo["peak_mb"]) / (hi["out_mp"] - lo["out_mp"])
        print(f"{label}: peak RSS growth {growth:.1f} MB per extra output MP "
              f"({lo['out_mp']:.0f} -> {hi['out_mp']:.0f} MP; bound 40 MB/MP: {'PASS' if growth <= 40 else 'FAIL'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="output megapixels")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--color-fix", default="wavelet")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", default=None, help="another checkout to measure the same way")
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(tmp)
        start = time.perf_counter()
        rows = {mp: measure(here, ckpt, mp, args) for mp in args.sizes}
        report("this checkout", rows)
        if args.baseline:
            report(f"baseline {args.baseline}", {mp: measure(args.baseline, ckpt, mp, args)
                                                  for mp in args.baseline_sizes})
        print(f"({time.perf_counter() - start:.0f} s; tile {args.tile}, tile batch {args.tile_batch}, "
              f"colour fix {args.color_fix}, x{SCALE}, tiny pixel UNet, CPU)")


if __name__ == "__main__":
    main()
