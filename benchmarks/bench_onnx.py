"""The upscale job with each backend on the same images, in one run: torch (the checkpoint) against
onnxruntime (its `flowsr export`), img/s of the whole Ray Data job (files in, files out).

CPU (default): pixel-small (the demo's model, random weights) or `--backbone sd` (tiny SD
shapes), 64^2 -> 256^2 PNGs, one upscaler actor with the same CPUs for both backends (torch's
threads = the actor's CPUs, which onnxruntime's session takes too). Prints the export time, each
backend's img/s (overall and steady), the ratio onnxruntime / torch and the largest difference
between the two backends' outputs in 8-bit levels.

    python benchmarks/bench_onnx.py [--backbone pixel|sd] [--images 24] [--lr-size 64] [--rounds 2]

`section(workdir)` is the same comparison as one dict (figures, `anchor` = the torch backend of
the same run, `ratio`), for a benchmark suite.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from benchmarks.bench_upscale import make_inputs

SCALE = 4


def make_checkpoint(root: str, backbone: str) -> str:
    """A FlowSR inference checkpoint with random weights: pixel-small, or the tiny SD shapes."""
    from flowsr.backbones import build_backbone
    from flowsr.config import preset
    from flowsr.tiny import tiny_config

    cfg = preset("pixel-small") if backbone == "pixel" else tiny_config(os.path.join(root, "tiny"))
    torch.manual_seed(0)
    ckpt = os.path.join(root, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    cfg.save(os.path.join(ckpt, "config.json"))
    build_backbone(cfg.model).save_trainable(os.path.join(ckpt, "student"))
    return ckpt


def run_job(model: str, in_dir: str, out_dir: str, *, batch_size: int, cpus: float, num_gpus: Optional[float]) -> dict:
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    cfg = UpscaleJobConfig(input=in_dir, output=out_dir, checkpoint=model, scale=SCALE, tile=128, tile_overlap=16,
                           vae_tile=0, batch_size=batch_size, tile_batch=batch_size, cpus_per_actor=cpus,
                           num_gpus=num_gpus, format="png", overwrite=True)
    return upscale_corpus(cfg)


def upscaler_seconds(manifest: str) -> float:
    """Mean seconds per image inside the upscaler actor (network, tiles, blend, colour fix; no decode,
    encode or Ray), from the manifest's `seconds` column."""
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(manifest, columns=["status", "seconds"]).to_pylist() if r["status"] == "ok"]
    return sum(r["seconds"] for r in rows) / max(len(rows), 1)


@torch.no_grad()
def network_ms(ckpt: str, path: str, batch: int, size: int, threads: int, repeats: int = 5) -> dict:
    """Best ms per forward of one batch of `size`^2 inputs at the output size, torch eager (the
    upscaler's backbone, LoRA merged) against the onnxruntime session, both on `threads` threads."""
    from flowsr.checkpoint import load_for_inference
    from flowsr.export import session
    from flowsr.sample import super_resolve
    from flowsr.upscaler import merge_adapters

    torch.set_num_threads(threads)
    backbone, _ = load_for_inference(ckpt)
    merge_adapters(backbone)
    sess = session(path, threads=threads)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = {"torch": lambda: super_resolve(backbone, x), "onnxruntime": lambda: sess.run(["sr"], {"lr_up": x.numpy()})}
    best = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) * 1000)
    return {k: round(v, 1) for k, v in best.items()}


def max_levels(a_dir: str, b_dir: str) -> int:
    """The largest |a - b| over the PNGs both folders hold, in 8-bit levels."""
    from PIL import Image

    worst = 0
    for name in sorted(f for f in os.listdir(a_dir) if f.endswith(".png")):
        a = np.asarray(Image.open(os.path.join(a_dir, name))).astype(int)
        b = np.asarray(Image.open(os.path.join(b_dir, name))).astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def compare(root: str, *, backbone: str = "pixel", images: int = 24, lr_size: int = 64, batch_size: int = 4,
            cpus: float = 1.0, num_gpus: Optional[float] = 0, rounds: int = 2, log=print) -> dict:
    """Both backends on the same corpus, `rounds` times in alternation (the best round counts)."""
    from flowsr.export import export_checkpoint

    ckpt = make_checkpoint(root, backbone)
    start = time.perf_counter()
    report = export_checkpoint(ckpt, os.path.join(root, "model.onnx"))
    log(f"export: {time.perf_counter() - start:.1f} s, max |onnxruntime - torch| {report.max_error:.2g}, "
        f"{report.parameters} parameters, size multiple {report.size_multiple}")
    net = network_ms(ckpt, report.path, batch_size, lr_size * SCALE, threads=max(1, int(cpus)))
    log(f"network alone, batch {batch_size} of {lr_size * SCALE}^2, {max(1, int(cpus))} thread(s), best of 5: "
        f"torch {net['torch']} ms, onnxruntime {net['onnxruntime']} ms ({net['torch'] / net['onnxruntime']:.2f}x)")
    in_dir = os.path.join(root, "in")
    make_inputs(in_dir, images, lr_size)
    models = {"torch": ckpt, "onnxruntime": report.path}
    best: dict = {}
    for r in range(rounds):
        for name, model in models.items():
            s = run_job(model, in_dir, os.path.join(root, name), batch_size=batch_size, cpus=cpus, num_gpus=num_gpus)
            per_image = upscaler_seconds(s["manifest"])
            log(f"round {r + 1} {name:12s}: {s['images_per_s']:7.3f} img/s over {s['seconds']:.1f} s "
                f"(steady {s['steady_images_per_s']}); in the upscaler {per_image * 1000:.0f} ms/img; "
                f"ok {s['ok']}, errors {s['error']}")
            if s["ok"] != images:
                raise RuntimeError(f"{name}: {s['ok']} of {images} images upscaled")
            fastest = min(per_image * 1000, best.get(name, {}).get("upscaler_ms_per_image", float("inf")))
            if s["images_per_s"] > best.get(name, {}).get("images_per_s", 0):
                best[name] = {"images_per_s": s["images_per_s"], "steady_images_per_s": s["steady_images_per_s"],
                              "seconds": s["seconds"]}
            best[name]["upscaler_ms_per_image"] = round(fastest, 1)
    levels = max_levels(os.path.join(root, "torch"), os.path.join(root, "onnxruntime"))
    return {"backbone": backbone, "images": images, "lr_size": lr_size, "scale": SCALE, "batch_size": batch_size,
            "cpus_per_actor": cpus, "export_s": report.seconds, "network_ms": net, **best, "max_level_difference": levels,
            "anchor": {"img_per_s": best["torch"]["images_per_s"], "source": "the torch backend in this run"},
            "ratio": round(best["onnxruntime"]["images_per_s"] / best["torch"]["images_per_s"], 3),
            "upscaler_ratio": round(best["torch"]["upscaler_ms_per_image"] / best["onnxruntime"]["upscaler_ms_per_image"], 3)}


def section(workdir: str, *, images: int = 24, num_gpus: Optional[float] = 0) -> dict:
    """The comparison as one record for a benchmark suite (pixel-small, 64^2 -> 256^2, 1 round)."""
    from jobs.common import init_ray

    init_ray(None)
    return compare(workdir, images=images, num_gpus=num_gpus, rounds=1, log=lambda *_: None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("pixel", "sd"), default="pixel")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--lr-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each backend counts")
    args = ap.parse_args(argv)
    import ray

    from jobs.common import init_ray

    init_ray(None, object_store_memory=1 << 30)
    with tempfile.TemporaryDirectory() as root:
        print(f"{args.backbone}, random weights, fp32, CPU; {args.images} images {args.lr_size}^2 -> "
              f"{args.lr_size * SCALE}^2 PNG, tiles 128 LR px, batch {args.batch_size}, "
              f"{args.cpus_per_actor:g} CPU per actor ({os.cpu_count()} cores)", flush=True)
        rec = compare(root, backbone=args.backbone, images=args.images, lr_size=args.lr_size,
                      batch_size=args.batch_size, cpus=args.cpus_per_actor, rounds=args.rounds,
                      log=lambda text: print(text, flush=True))
    ray.shutdown()
    for name in ("torch", "onnxruntime"):
        print(f"{name:12s} {rec[name]['images_per_s']:7.3f} img/s, {rec[name]['upscaler_ms_per_image']:7.1f} ms/img in "
              f"the upscaler (best of {args.rounds})")
    print(f"onnxruntime / torch: job {rec['ratio']:.2f}x, upscaler {rec['upscaler_ratio']:.2f}x; outputs differ by at "
          f"most {rec['max_level_difference']} level(s)")


if __name__ == "__main__":
    main()
