"""Real-ESRGAN-architecture throughput: the whole upscale job (files in, files out, a spandrel
weights file through `pipeline.sr_models`) against a plain per-image loop (read, spandrel call,
write; batch 1, eager), measured in one run.

The model is the RealESRGAN_x4plus architecture (RRDBNet: 23 blocks, 64 features, growth 32, x4)
with random weights, saved as a .pth with Real-ESRGAN's key names when BasicSR is installed
(`pip install -e '.[bench]'`), else spandrel's own RRDBNet keys.

CPU (default): 32^2 -> 128^2 PNGs, fp32, the loop on 1 thread (what the job's one actor gets).
GPU (--gpu, needs CUDA): 128^2 -> 512^2, bf16 (the design notes' anchor: 205 img/s at batch 16).

    python benchmarks/bench_spandrel.py [--gpu] [--images N] [--size LR] [--blocks 23]
                                        [--batch-size B] [--pool-size P] [--compile] [--no-loop]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_upscale import images_per_second, make_inputs

SCALE = 4


def make_weights(path: str, blocks: int) -> str:
    """A random-init RealESRGAN_x4plus-architecture .pth (Real-ESRGAN's {"params_ema": ...} layout)."""
    torch.manual_seed(0)
    try:
        import torchvision.transforms.functional as tvf

        sys.modules.setdefault("torchvision.transforms.functional_tensor", tvf)  # basicsr 1.4.2
        from basicsr.archs.rrdbnet_arch import RRDBNet

        net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=blocks, num_grow_ch=32, scale=SCALE)
        state = {"params_ema": net.state_dict()}
    except ImportError:
        from spandrel.architectures.ESRGAN import ESRGAN

        state = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=blocks, scale=SCALE).state_dict()
    torch.save(state, path)
    return path


@torch.no_grad()
def plain_loop(weights: str, paths: list, out_dir: str, device: torch.device, dtype: torch.dtype) -> float:
    """images/s of the eager per-image spandrel loop (model load and one warm-up image excluded)."""
    import spandrel
    from PIL import Image

    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU budget of the job's one actor (Ray gives it 1 thread)
    model = spandrel.ModelLoader(device).load_from_file(weights).eval().to(dtype)
    os.makedirs(out_dir, exist_ok=True)

    def one(path):
        lr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).to(device)
        sr = model(lr.permute(2, 0, 1)[None].to(dtype) / 255)
        out = (sr[0].float() * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(out).save(os.path.join(out_dir, os.path.basename(path)), compress_level=3)

    return images_per_second(one, paths, device)


def whole_job(weights: str, in_dir: str, out_dir: str, args) -> dict:
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    cfg = UpscaleJobConfig(input=in_dir, output=out_dir, checkpoint=weights, tile=0, batch_size=args.batch_size,
                           pool_size=args.pool_size, compile=args.compile, format="png")
    return upscale_corpus(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, 128^2 -> 512^2")
    ap.add_argument("--images", type=int, default=None, help="corpus size (default 12 on CPU, 512 on GPU)")
    ap.add_argument("--size", type=int, default=None, help="LR side in pixels (default 32 on CPU, 128 on GPU)")
    ap.add_argument("--blocks", type=int, default=23, help="RRDB blocks (23: RealESRGAN_x4plus)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per upscaler call (default 4 CPU, 16 GPU)")
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile in the job's upscalers")
    ap.add_argument("--no-loop", action="store_true", help="skip the plain loop")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    args.images = args.images or (512 if args.gpu else 12)
    args.size = args.size or (128 if args.gpu else 32)
    args.batch_size = args.batch_size or (16 if args.gpu else 4)
    from jobs.common import init_ray

    with tempfile.TemporaryDirectory() as root:
        weights = make_weights(os.path.join(root, "RealESRGAN_x4plus_random.pth"), args.blocks)
        paths = make_inputs(os.path.join(root, "in"), args.images, args.size)
        print(f"RealESRGAN_x4plus architecture ({args.blocks} blocks), random weights, "
              f"{'bf16, GPU' if args.gpu else 'fp32, CPU'}; {args.images} images {args.size}^2 -> "
              f"{args.size * SCALE}^2 PNG", flush=True)
        rate = None
        if not args.no_loop:
            rate = plain_loop(weights, paths, os.path.join(root, "loop_out"), device, dtype)
            print(f"plain per-image spandrel loop (batch 1, eager{', 1 thread' if not args.gpu else ''}): "
                  f"{rate:8.2f} img/s", flush=True)
        start = time.perf_counter()
        init_ray(None, object_store_memory=None if args.gpu else 1 << 30)
        ray_s = time.perf_counter() - start
        s = whole_job(weights, os.path.join(root, "in"), os.path.join(root, "job_out"), args)
        print(f"whole Ray Data job (batch {args.batch_size}, pool {args.pool_size}, compile {args.compile}): "
              f"{s['images_per_s']:8.2f} img/s over {s['seconds']:.1f} s incl. listing, probing, model check and "
              f"actor start; steady {s['steady_images_per_s']} img/s (ray.init {ray_s:.1f} s not counted); "
              f"ok {s['ok']}, errors {s['error']}", flush=True)
        if rate:
            steady = s["steady_images_per_s"]
            print(f"job / loop: {s['images_per_s'] / rate:.2f}x overall"
                  + (f", {steady / rate:.2f}x steady" if steady else ""), flush=True)


if __name__ == "__main__":
    main()
