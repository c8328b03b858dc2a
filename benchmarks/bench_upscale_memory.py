"""Peak memory of the upscaler actor against the output size: is it bounded by tiles?

Each output size runs in a fresh process that does what one upscaler actor of `jobs.upscale`
does for one image: the actor class (`pipeline.upscale_stages.ArrowUpscaleStage`) is built on a model,
then called on one decoded row (a pyarrow table, as Ray Data hands it over). The process's RSS is
read before the call and its peak RSS after (the peak is reset before the call, through
/proc/self/clear_refs, so that it is the call's, not that of imports and model loading). Two models, each loaded through the job's
seam (`pipeline.sr_models.load_upscaler`):

- flowsr: a tiny pixel-UNet FlowSR checkpoint (x4);
- spandrel: a tiny Real-ESRGAN-architecture weights file (spandrel's RRDBNet class, 8 features,
  1 block, x4 native), saved to a temporary `.pth` file; `--spandrel-scale` other than 4 also
  resizes its output on the way (Real-ESRGAN's --outscale).

The growth per extra output megapixel between the smallest and the largest size is the figure
docs/DESIGN.md bounds (<= 40 MB per output MP); it includes the output itself (3 B/pixel for 8-bit
RGB) and the copies the row hand-over makes. Tiles are `--tile` input pixels.

    PYTHONPATH=. python benchmarks/bench_upscale_memory.py [--models flowsr spandrel] [--sizes 1 16 64] [--tile 128]

`--baseline DIR` also runs the same measurement with the code in DIR (e.g. an older checkout)
for the sizes in `--baseline-sizes`, and prints the ratio of its growth per MP to this one's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SCALE = 4  # the models' native scale
CHILD = r"""
import json, resource, sys, time
import numpy as np, pyarrow as pa
from pipeline.upscale_stages import ArrowUpscaleStage

model, side, tile, tile_batch, color_fix, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
stage = ArrowUpscaleStage(model, scale=scale, tile=tile, tile_overlap=tile // 8, vae_tile=tile,
                          tile_batch=tile_batch, color_fix=color_fix, bucket=64)
y, x = np.mgrid[0:side, 0:side]
lr = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
row = {"input": ["x.png"], "output": ["x.png"], "in_height": [side], "in_width": [side], "out_height": [0],
       "out_width": [0], "status": ["pending"], "error": [""], "pixels": [lr.tobytes()], "alpha": [b""],
       "dtype": ["uint8"], "height": [side], "width": [side], "channels": [3]}
table = pa.table({k: pa.array(v, type=pa.large_binary()) if k in ("pixels", "alpha") else v for k, v in row.items()})
del lr, row, x, y
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
try:  # reset the peak (VmHWM) to the current RSS, so that the peaks of imports and loading do not hide the call's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    def peak_mb():
        return status_mb("VmHWM")
except OSError:
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = status_mb("VmRSS")
start = time.perf_counter()
out = stage(table)
seconds = time.perf_counter() - start
assert out.column("status").to_pylist() == ["pending"], out.column("error").to_pylist()
assert out.column("height").to_pylist() == [int(side * scale + 0.5)], out.column("height").to_pylist()
print(json.dumps({"before_mb": before, "peak_mb": peak_mb(), "seconds": seconds, "out_mp": (side * scale) ** 2 / 1e6}))
"""


def build_checkpoint(directory: str) -> str:
    """A tiny FlowSR checkpoint (pixel UNet, random init) in `directory`."""
    import torch

    from flowsr.backbones import PixelBackbone
    from flowsr.config import apply_overrides, preset

    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[4]"])
    torch.manual_seed(0)
    backbone = PixelBackbone.from_config(cfg.model)
    cfg.save(os.path.join(directory, "config.json"))
    backbone.save_trainable(os.path.join(directory, "student"))
    return directory


def build_weights(directory: str) -> str:
    """A tiny Real-ESRGAN-architecture x4 weights file (spandrel's RRDBNet, random init)."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=SCALE)
    path = os.path.join(directory, "RealESRGAN_x4_tiny.pth")
    torch.save(net.state_dict(), path)
    return path


def measure(code_dir: str, model: str, megapixels: int, scale: float, args) -> dict:
    side = int(round((megapixels * 1_000_000) ** 0.5 / scale / 8)) * 8
    env = {**os.environ, "PYTHONPATH": code_dir, "OMP_NUM_THREADS": str(args.threads), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", CHILD, model, str(side), str(args.tile), str(args.tile_batch),
                             args.color_fix, str(scale)], env=env, cwd=code_dir, capture_output=True, text=True)
    if result.returncode != 0:
        return {"failed": result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {code_dir} {os.path.basename(model)}: {figures['out_mp']:.1f} MP out: peak RSS {figures['peak_mb']:.0f} MB "
          f"({figures['before_mb']:.0f} before the call), {figures['seconds']:.0f} s", flush=True)
    return figures


def report(label: str, rows: dict):
    """Print the rows; returns the growth in MB per extra output MP (None with fewer than 2 sizes)."""
    print(f"{label}: {'out MP':>8} {'peak RSS MB':>12} {'before MB':>10} {'seconds':>8}")
    for mp, r in rows.items():
        if "failed" in r:
            print(f"{'':{len(label)}}  {mp:>8} failed: {r['failed']}")
        else:
            print(f"{'':{len(label)}}  {r['out_mp']:>8.1f} {r['peak_mb']:>12.0f} {r['before_mb']:>10.0f} {r['seconds']:>8.1f}")
    ok = [r for r in rows.values() if "failed" not in r]
    if len(ok) < 2:
        return None
    lo, hi = ok[0], ok[-1]
    growth = (hi["peak_mb"] - lo["peak_mb"]) / (hi["out_mp"] - lo["out_mp"])
    print(f"{label}: peak RSS growth {growth:.1f} MB per extra output MP "
          f"({lo['out_mp']:.0f} -> {hi['out_mp']:.0f} MP; bound 40 MB/MP: {'PASS' if growth <= 40 else 'FAIL'})")
    return growth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("flowsr", "spandrel"), default=["flowsr", "spandrel"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="output megapixels")
    p.add_argument("--tile", type=int, default=128, help="tile size in input pixels")
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--color-fix", default="wavelet", help="FlowSR's colour fix")
    p.add_argument("--spandrel-scale", type=float, default=SCALE, help="output scale of the x4 spandrel model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", default=None, help="another checkout to measure the same way")
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        models = {"flowsr": (build_checkpoint(tmp), SCALE), "spandrel": (build_weights(tmp), args.spandrel_scale)}
        start = time.perf_counter()
        for name in args.models:
            model, scale = models[name]
            label = f"{name} x{scale:g}"
            growth = report(f"{label}, this checkout", {mp: measure(here, model, mp, scale, args) for mp in args.sizes})
            if args.baseline:
                base = report(f"{label}, baseline {args.baseline}",
                              {mp: measure(args.baseline, model, mp, scale, args) for mp in args.baseline_sizes})
                if growth and base:
                    print(f"{label}: baseline / this checkout growth per MP: {base / growth:.1f}x")
        print(f"({time.perf_counter() - start:.0f} s; tile {args.tile} input px, tile batch {args.tile_batch}, "
              f"FlowSR colour fix {args.color_fix}, CPU, {args.threads} threads)")


if __name__ == "__main__":
    main()
