"""Sizing table of cluster/README.md: GPU-hours, cluster size, storage and network per job.

Pure arithmetic over `FIGURES` (per-GPU throughputs, file sizes, model sizes); each figure
carries its kind (anchor | measured | paper | estimate | assumption) and source, and the table
prints them. When a benchmark gives a new number, edit `FIGURES` and regenerate:

    python cluster/sizing.py > /tmp/sizing.md      # paste into cluster/README.md
    python cluster/sizing.py --measure-png         # re-measure the PNG sizes used below

Model of each job (one H200-class GPU is the unit; a node has `gpus_per_node` of them):
- caption: every pair gets two captions (HR and LR, two `generate` calls; pipeline/caption.py);
  GPU-seconds = 2 N / captions_per_s / utilization.
- train: the paper recipe (10k stage-1 + 20k stage-2 steps at global batch 16), split over W
  workers; a step of per-worker batch b takes `a + c b` (a line through the two stage-1
  anchors), stage 2 takes `stage2_ratio` times that, plus a ring all-reduce of the LoRA grads.
- upscale: 128^2 -> 512^2 (x4), GPU-seconds = N / upscale_img_per_s / utilization.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

GB = 1e9


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    kind: str  # anchor (docs/DESIGN.md, measured on an H200) | measured | paper | estimate | assumption
    source: str


FIGURES: Dict[str, Figure] = {
    # ---- per-GPU throughput ----
    "captions_per_s": Figure(57.0, "captions/s/GPU", "anchor",
                             "docs/DESIGN.md 'Performance anchors': Qwen2-VL-2B shapes, random init, H200, bf16, "
                             "batch 256, 512^2 image, 40 new tokens"),
    "captions_per_pair": Figure(2, "captions/pair", "measured",
                                "pipeline/caption.py: one HR and one LR `generate` per pair"),
    "stage1_step_b4_s": Figure(0.24, "s/step", "anchor",
                               "docs/DESIGN.md 'Performance anchors': stage-1 step, SD 2.1-base shapes, LoRA r32, "
                               "bf16, 512^2, batch 4, H200, no LPIPS"),
    "stage1_step_b8_s": Figure(0.39, "s/step", "anchor", "same, batch 8 (35 GB)"),
    "stage2_ratio": Figure(35 / 12, "x stage-1 step", "estimate",
                           "no stage-2 GPU figure yet: ratio of issue 5's goals (35 img/s stage 1, "
                           "12 img/s stage 2 per H200 at batch 8)"),
    "upscale_img_per_s": Figure(47.0, "img/s/GPU", "anchor",
                                "docs/DESIGN.md: one-step SR, plain diffusers eager, batch 16-32, 512^2 out, H200"),
    "upscale_compiled_img_per_s": Figure(88.0, "img/s/GPU", "anchor",
                                         "docs/DESIGN.md: torch.compile, channels_last, batch 16, H200 "
                                         "(model forward only; file I/O not included)"),
    # ---- sizes ----
    "hr_png_bytes": Figure(417e3, "bytes", "measured",
                           "512^2 RGB crops of skimage photos (8 crops of astronaut, hubble_deep_field, "
                           "immunohistochemistry, retina), PNG level 1 as pipeline/schema.py writes"),
    "lr_png_bytes": Figure(28.3e3, "bytes", "measured",
                           "the same crops degraded by pipeline/degrade.py to 128^2, PNG level 1"),
    "out_png_bytes": Figure(410e3, "bytes", "measured",
                            "the 512^2 crops at PNG level 3 (pipeline/image_codecs.py's output level)"),
    "row_overhead_bytes": Figure(2e3, "bytes/pair", "assumption",
                                 "degradation JSON, ids, captions and Parquet framing per pair row"),
    "caption_row_bytes": Figure(400, "bytes/pair", "assumption", "a caption-table row: sample_id + 2 captions"),
    "lora_params": Figure(30.6e6, "params", "measured",
                          "peft LoRA r32 on flowsr.config.ModelConfig.lora_targets of the SD 2.1-base UNet "
                          "(meta-device count)"),
    "qwen_weights_bytes": Figure(4.4 * GB, "bytes", "estimate", "Qwen2-VL-2B-Instruct in bf16 (2.2B params)"),
    "sd_weights_bytes": Figure(5.2 * GB, "bytes", "estimate",
                               "SD 2.1-base fp16 (UNet+VAE+text encoder) + CLIP ViT-L/14 + LPIPS VGG"),
    # ---- cluster ----
    "gpus_per_node": Figure(8, "GPUs/node", "assumption", "p5/p4d-class nodes (cluster/launcher/aws.yaml)"),
    "utilization": Figure(0.8, "fraction", "assumption",
                          "share of GPU time spent at the benchmark rate (actor start-up, stragglers, I/O stalls)"),
    "deadline_h": Figure(24, "h", "assumption", "wall-clock target used to size the cluster for N items"),
    "allreduce_gbps": Figure(25.0, "GB/s", "assumption",
                             "effective all-reduce bus bandwidth per GPU (NVLink in a node; EFA across p5 nodes)"),
    "recipe_stage1_steps": Figure(10_000, "steps", "paper", "paper / docs/DESIGN.md hyper-parameters"),
    "recipe_stage2_steps": Figure(20_000, "steps", "paper", "paper / docs/DESIGN.md hyper-parameters"),
    "recipe_batch": Figure(16, "pairs/step", "paper", "paper / docs/DESIGN.md hyper-parameters"),
}

N_VALUES = (10**5, 10**6, 10**7, 10**8, 10**9)
TRAIN_WORKERS = (1, 2, 4, 8, 16)


def v(figs: Dict[str, Figure], key: str) -> float:
    return figs[key].value


# ---- the arithmetic ------------------------------------------------------------------------------
def cluster_for(gpu_hours: float, figs: Dict[str, Figure]) -> Dict[str, float]:
    """GPUs (and nodes) that finish `gpu_hours` of work within the deadline, and the wall-clock."""
    gpus = max(1, math.ceil(gpu_hours / v(figs, "deadline_h")))
    per_node = int(v(figs, "gpus_per_node"))
    return {"gpus": gpus, "nodes": math.ceil(gpus / per_node), "wall_h": gpu_hours / gpus,
            "gpus_in_node": min(gpus, per_node)}


def pair_bytes(figs: Dict[str, Figure]) -> float:
    return v(figs, "hr_png_bytes") + v(figs, "lr_png_bytes") + v(figs, "row_overhead_bytes")


def caption_row(n: int, figs: Dict[str, Figure]) -> Dict[str, float]:
    """Caption `n` pairs: reads the pair shards, writes a caption table."""
    pairs_per_s = v(figs, "captions_per_s") / v(figs, "captions_per_pair")
    gpu_hours = n / pairs_per_s / v(figs, "utilization") / 3600
    c = cluster_for(gpu_hours, figs)
    return {**c, "n": n, "gpu_hours": gpu_hours,
            "shared_bytes": n * (pair_bytes(figs) + v(figs, "caption_row_bytes")),
            "node_disk_bytes": v(figs, "qwen_weights_bytes"),
            "node_net_Bps": c["gpus_in_node"] * pairs_per_s * pair_bytes(figs)}


def train_step_s(per_worker_batch: float, workers: int, figs: Dict[str, Figure]) -> Dict[str, float]:
    """(stage-1, stage-2) step seconds at `per_worker_batch` on `workers` GPUs."""
    b4, b8 = v(figs, "stage1_step_b4_s"), v(figs, "stage1_step_b8_s")
    per_image = (b8 - b4) / 4
    fixed = b4 - 4 * per_image
    grads = v(figs, "lora_params") * 4  # fp32 gradients of the trainable LoRA
    allreduce = 2 * (workers - 1) / workers * grads / (v(figs, "allreduce_gbps") * GB) if workers > 1 else 0.0
    s1 = fixed + per_image * per_worker_batch
    return {"stage1": s1 + allreduce, "stage2": s1 * v(figs, "stage2_ratio") + allreduce}


def train_row(workers: int, figs: Dict[str, Figure]) -> Dict[str, float]:
    """The paper recipe on `workers` GPUs at global batch `recipe_batch`."""
    batch = v(figs, "recipe_batch")
    step = train_step_s(batch / workers, workers, figs)
    seconds = (v(figs, "recipe_stage1_steps") * step["stage1"] + v(figs, "recipe_stage2_steps") * step["stage2"])
    wall_h = seconds / v(figs, "utilization") / 3600
    per_node = min(workers, int(v(figs, "gpus_per_node")))
    nodes = math.ceil(workers / v(figs, "gpus_per_node"))
    read_Bps = per_node * (batch / workers) / step["stage1"] * pair_bytes(figs)
    ring_Bps = 2 * v(figs, "lora_params") * 4 / step["stage1"] if nodes > 1 else 0.0
    return {"workers": workers, "nodes": nodes, "per_worker_batch": batch / workers,
            "stage1_s": step["stage1"], "stage2_s": step["stage2"], "wall_h": wall_h,
            "gpu_hours": wall_h * workers, "node_net_Bps": read_Bps + ring_Bps}


def train_data_row(n: int, figs: Dict[str, Figure]) -> Dict[str, float]:
    """What a training set of `n` pairs costs to hold and how often the recipe sees each pair."""
    seen = (v(figs, "recipe_stage1_steps") + v(figs, "recipe_stage2_steps")) * v(figs, "recipe_batch")
    return {"n": n, "shared_bytes": n * pair_bytes(figs), "epochs": seen / n}


def checkpoint_bytes(figs: Dict[str, Figure]) -> float:
    """Stage-2 checkpoint: student + EMA LoRA and the student's Adam moments, fp32."""
    return v(figs, "lora_params") * 4 * 4


def upscale_row(n: int, figs: Dict[str, Figure]) -> Dict[str, float]:
    """Upscale `n` images 128^2 -> 512^2: reads LR files, writes 512^2 PNGs."""
    rate = v(figs, "upscale_img_per_s")
    gpu_hours = n / rate / v(figs, "utilization") / 3600
    compiled = n / v(figs, "upscale_compiled_img_per_s") / v(figs, "utilization") / 3600
    c = cluster_for(gpu_hours, figs)
    per_image = v(figs, "lr_png_bytes") + v(figs, "out_png_bytes")
    return {**c, "n": n, "gpu_hours": gpu_hours, "compiled_gpu_hours": compiled,
            "shared_bytes": n * per_image, "node_disk_bytes": v(figs, "sd_weights_bytes"),
            "node_net_Bps": c["gpus_in_node"] * rate * per_image}


# ---- rendering -----------------------------------------------------------------------------------
def fmt_bytes(x: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def fmt_rate(bps: float) -> str:
    return f"{fmt_bytes(bps)}/s ({bps * 8 / 1e9:.2g} Gbit/s)"


def fmt_hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def fmt_n(n: int) -> str:
    return f"10^{round(math.log10(n))}"


def table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render(figs: Dict[str, Figure] = FIGURES) -> str:
    per_node = int(v(figs, "gpus_per_node"))
    deadline = v(figs, "deadline_h")
    out = ["Generated by `python cluster/sizing.py` from the figures listed below; H200-class GPUs, "
           f"nodes of {per_node} GPUs, {v(figs, 'utilization'):.0%} utilization, clusters sized to finish "
           f"within {deadline:g} h. Shared storage = the bucket (s3:// or gs://) the job reads and writes; "
           "per-node disk = model weights cached on local disk (HF_HOME) next to Ray's spill space; "
           "per-node network = bucket traffic of a full node at the benchmark rate.", ""]

    rows = [caption_row(n, figs) for n in N_VALUES]
    out += ["**Caption N pairs** (Qwen2-VL-2B, HR + LR caption per pair; the job's default 7B model "
            "is slower and not yet measured)", "",
            table(["N pairs", "GPU-hours", f"GPUs (nodes) for {deadline:g} h", "wall-clock h",
                   "shared storage (shards + captions)", "per-node disk", "per-node network"],
                  [[fmt_n(r["n"]), fmt_hours(r["gpu_hours"]), f"{r['gpus']:,} ({r['nodes']:,})",
                    f"{r['wall_h']:.3g}", fmt_bytes(r["shared_bytes"]), fmt_bytes(r["node_disk_bytes"]),
                    fmt_rate(r["node_net_Bps"])] for r in rows]), ""]

    rows = [train_row(w, figs) for w in TRAIN_WORKERS]
    out += [f"**Train the paper recipe** ({v(figs, 'recipe_stage1_steps'):,.0f} stage-1 + "
            f"{v(figs, 'recipe_stage2_steps'):,.0f} stage-2 steps at global batch "
            f"{v(figs, 'recipe_batch'):g}; `--num-workers W --use-gpu`). The cost does not depend on N: "
            "the global batch is fixed, so more workers shorten the run but shrink the per-worker batch, "
            "and the fixed per-step cost makes GPU-hours grow.", "",
            table(["workers W (nodes)", "batch/worker", "stage-1 step s", "stage-2 step s", "wall-clock h",
                   "GPU-hours", "per-node network (shards + all-reduce)"],
                  [[f"{r['workers']} ({r['nodes']})", f"{r['per_worker_batch']:g}", f"{r['stage1_s']:.3f}",
                    f"{r['stage2_s']:.3f}", f"{r['wall_h']:.3g}", fmt_hours(r["gpu_hours"]),
                    fmt_rate(r["node_net_Bps"])] for r in rows]), ""]
    rows = [train_data_row(n, figs) for n in N_VALUES]
    out += [f"Training data of N pairs (the recipe reads "
            f"{(v(figs, 'recipe_stage1_steps') + v(figs, 'recipe_stage2_steps')) * v(figs, 'recipe_batch'):,.0f} "
            f"pairs in all); per-node disk: {fmt_bytes(v(figs, 'sd_weights_bytes'))} of weights, and each "
            f"checkpoint is about {fmt_bytes(checkpoint_bytes(figs))} (LoRA + EMA + Adam, fp32) in `runs/<name>/`.", "",
            table(["N pairs", "shard storage", "epochs of the recipe"],
                  [[fmt_n(r["n"]), fmt_bytes(r["shared_bytes"]), f"{r['epochs']:.3g}"] for r in rows]), ""]

    rows = [upscale_row(n, figs) for n in N_VALUES]
    out += ["**Upscale N images** 128^2 -> 512^2 (one step; eager rate sizes the cluster, the compiled "
            "rate shows the gain of `torch.compile`)", "",
            table(["N images", "GPU-hours (eager)", "GPU-hours (compiled)", f"GPUs (nodes) for {deadline:g} h",
                   "wall-clock h", "shared storage (in + out)", "per-node disk", "per-node network"],
                  [[fmt_n(r["n"]), fmt_hours(r["gpu_hours"]), fmt_hours(r["compiled_gpu_hours"]),
                    f"{r['gpus']:,} ({r['nodes']:,})", f"{r['wall_h']:.3g}", fmt_bytes(r["shared_bytes"]),
                    fmt_bytes(r["node_disk_bytes"]), fmt_rate(r["node_net_Bps"])] for r in rows]), ""]

    out += ["Figures (anchor = measured on one H200 and recorded in docs/DESIGN.md; measured = measured for "
            "this table on the CPU machine; paper = the recipe; estimate / assumption = "
            "not measured, replace when a benchmark reports):", "",
            table(["figure", "value", "unit", "kind", "source"],
                  [[k, f"{f.value:.4g}", f.unit, f.kind, f.source] for k, f in figs.items()])]
    return "\n".join(out)


def measure_png(seed: int = 0) -> Dict[str, float]:
    """Mean PNG sizes of 512^2 crops of skimage's colour photos and their degraded 128^2 LR."""
    import io

    import numpy as np
    import skimage.data
    from PIL import Image

    from pipeline.degrade import degrade
    from pipeline.schema import encode_png

    hr, lr, out = [], [], []
    for name in ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina"):
        image = getattr(skimage.data, name)()[..., :3]
        h, w = image.shape[:2]
        for i, (y, x) in enumerate(((0, 0), (h - 512, w - 512))):
            patch = np.ascontiguousarray(image[y:y + 512, x:x + 512])
            hr.append(len(encode_png(patch)))
            lr.append(len(encode_png(degrade(patch, seed=seed, sample_id=f"{name}-{i}")[0])))
            buf = io.BytesIO()
            Image.fromarray(patch).save(buf, format="PNG", compress_level=3)
            out.append(len(buf.getvalue()))
    return {"hr_png_bytes": float(np.mean(hr)), "lr_png_bytes": float(np.mean(lr)),
            "out_png_bytes": float(np.mean(out)), "crops": len(hr)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure-png", action="store_true", help="measure the PNG sizes instead")
    args = p.parse_args(argv)
    if args.measure_png:
        for key, value in measure_png().items():
            print(f"{key}: {value:,.0f}")
        return
    print(render())


if __name__ == "__main__":
    main()
