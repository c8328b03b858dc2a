"""Corpus-scale benchmark: the jobs hold at 10^4+ items with flat driver memory.

(a) driver memory vs corpus size: `jobs.prepare_data` and `jobs.upscale` (a tiny pixel-space
    FlowSR model, x2) over N small and 10 N small files; the driver's peak RSS (the job's own
    process; Ray workers are other processes) must stay within 1.3x from N to 10 N: no per-item
    state in the driver.
(b) upscale actor memory for 1, 16 and 64 MP outputs (`bench_upscale_memory.py`, run from here).
(c) the cost of the resumable-output layer (`pipeline.output`: lease, run record, streamed
    listing, content digests, Ray-built resume index) vs the same job at an older commit
    (`--old-rev`, extracted with `git archive`) on N files: wall time ratio, best and median of
    interleaved runs (goal <= 1.10).

Every measurement runs the job in a fresh subprocess with its own local Ray, on the same files;
the clock starts once Ray is up and has one worker process per CPU (Ray's own start is not the
job's cost; a job's actors and its workers' imports are).

    python benchmarks/bench_scale.py [--small 2000] [--large 20000] [--num-cpus 2]
        [--old-rev COMMIT] [--sections a,c] [--jobs prepare_data,upscale]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PATCH = 16  # tiny files: the job's per-item overhead dominates, which is what is measured

# A job run in a subprocess; prints one JSON line with its wall time, peak RSS and item count.
JOB_SCRIPT = """
import json, resource, sys, time
import ray
ray.init(num_cpus={num_cpus}, object_store_memory=1 << 29, include_dashboard=False, log_to_driver=False)
# one worker process up per CPU before the clock starts (Ray's own boot is not the job's cost)
ray.get([ray.remote(lambda: time.sleep(0.5)).remote() for _ in range({num_cpus})])
from {module} import {config}, {run}
start = time.perf_counter()
summary = {run}({config}(**{cfg!r}))
wall = time.perf_counter() - start
print("RESULT " + json.dumps({{"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "pairs": summary.get("{count}")}}))
"""
JOB = JOB_SCRIPT.replace("{module}", "jobs.prepare_data").replace("{config}", "PrepareConfig").replace(
    "{run}", "prepare").replace("{count}", "pairs_written")
# the upscale job, the same way; "pairs" is the number of images written
UPSCALE_JOB = JOB_SCRIPT.replace("{module}", "jobs.upscale").replace("{config}", "UpscaleJobConfig").replace(
    "{run}", "upscale_corpus").replace("{count}", "ok")
UPSCALE_BATCH = 64  # images per upscaler call: tiny images, so the per-batch overhead is what is measured


CHECKPOINT_SCRIPT = """
import sys, torch
from flowsr.backbones import PixelBackbone
from flowsr.config import apply_overrides, preset
cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]"])
torch.manual_seed(0)
cfg.save(sys.argv[1] + "/config.json")
PixelBackbone.from_config(cfg.model).save_trainable(sys.argv[1] + "/student")
"""


def make_checkpoint(folder: Path, src: Path = REPO) -> Path:
    """A tiny pixel-space FlowSR checkpoint (random weights; the job's cost, not its quality),
    written by the code in `src` (an older commit reads only the config fields it knows)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, str(folder)], cwd=src, env=env, check=True)
    return folder


def make_files(folder: Path, count: int) -> None:
    """`count` distinct PATCH x PATCH PNG files (distinct bytes: content ids must not collide)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (PATCH, PATCH, 3), dtype=np.uint8)).save(buf, format="PNG")
        (sub / f"img_{i:06d}.png").write_bytes(buf.getvalue())


def run_job(src: Path, input_dir: Path, output: Path, num_cpus: int, checkpoint: Optional[Path] = None) -> Dict:
    """prepare_data (or, given a `checkpoint`, upscale) over `input_dir` in a fresh process."""
    if checkpoint is None:
        cfg = dict(input=str(input_dir), output=str(output), patch_size=PATCH, crops_per_image=1,
                   degradation="bicubic", shard_rows=1000, files_per_task=64)
        script = JOB.format(cfg=cfg, num_cpus=num_cpus)
    else:
        cfg = dict(input=str(input_dir), output=str(output), checkpoint=str(checkpoint), scale=2.0, tile=0,
                   batch_size=UPSCALE_BATCH, color_fix="none", num_gpus=0)
        script = UPSCALE_JOB.format(cfg=cfg, num_cpus=num_cpus)
    env = {**os.environ, "PYTHONPATH": str(src), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=src, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def old_source(rev: str, into: Path) -> Path:
    """The repository at `rev` (git archive), for the baseline."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ---------------------------------------------------------------------------------------------
# (a) driver memory vs corpus size
# ---------------------------------------------------------------------------------------------

def section_a(work: Path, small: int, large: int, num_cpus: int, jobs: List[str]) -> None:
    for count in (small, large):
        if not (work / f"files-{count}").exists():
            make_files(work / f"files-{count}", count)
    for job in jobs:
        checkpoint = make_checkpoint(work / "ckpt") if job == "upscale" else None
        unit = "images written" if checkpoint else "pairs"
        print(f"(a) {job} driver peak RSS, {small} vs {large} files of {PATCH}x{PATCH}")
        results = {}
        for count in (small, large):
            results[count] = run_job(REPO, work / f"files-{count}", work / f"out-{count}", num_cpus, checkpoint)
            r = results[count]
            print(f"    {count:>7} files: wall {r['wall_s']:7.1f} s, {r['pairs']} {unit}, "
                  f"driver peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
            shutil.rmtree(work / f"out-{count}", ignore_errors=True)
        ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
        print(f"    RSS ratio {large}/{small} files: {ratio:.3f} (goal <= 1.30): {'ok' if ratio <= 1.3 else 'MISSED'}")


# ---------------------------------------------------------------------------------------------
# (b) upscale actor memory for 1 / 16 / 64 MP outputs
# ---------------------------------------------------------------------------------------------

def section_b(sizes: List[int]) -> None:
    """`bench_upscale_memory.py` (its own script, so that it also runs alone): the upscaler
    actor's peak RSS for each output size, FlowSR and a spandrel (Real-ESRGAN) model, and the
    growth per extra output megapixel (goal <= 40 MB/MP)."""
    print(f"(b) upscale actor peak RSS for {', '.join(map(str, sizes))} MP outputs (bench_upscale_memory.py)",
          flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_upscale_memory.py"),
                    "--sizes", *map(str, sizes)], cwd=REPO, env=env, check=True)


# ---------------------------------------------------------------------------------------------
# (c) cost of the output layer vs an older commit
# ---------------------------------------------------------------------------------------------

def section_c(work: Path, count: int, num_cpus: int, old_rev: Optional[str], repeats: int, jobs: List[str]) -> None:
    if not old_rev:
        print("(c) output-layer cost: skipped (give --old-rev COMMIT for the baseline)")
        return
    folder = work / f"files-{count}"
    if not folder.exists():
        make_files(folder, count)
    old = old_source(old_rev, work / "old-src")
    for job in jobs:
        checkpoints = {name: make_checkpoint(work / f"ckpt-{name}", src) if job == "upscale" else None
                       for name, src in (("old", old), ("new", REPO))}
        print(f"(c) {job} wall time on {count} files: this checkout vs {old_rev} "
              f"({repeats} runs each, interleaved)", flush=True)
        walls = {"old": [], "new": []}
        for i in range(repeats):  # interleaved, so machine load drifts hit both alike
            for name, src in (("old", old), ("new", REPO)):
                target = work / f"out-c-{name}-{i}"
                walls[name].append(run_job(src, folder, target, num_cpus, checkpoints[name])["wall_s"])
                shutil.rmtree(target, ignore_errors=True)
        best = {k: min(v) for k, v in walls.items()}
        median = {k: float(np.median(v)) for k, v in walls.items()}
        print(f"    old {[round(w, 2) for w in walls['old']]} s, new {[round(w, 2) for w in walls['new']]} s")
        for label, figures in (("best", best), ("median", median)):
            ratio = figures["new"] / figures["old"]
            print(f"    {label:>6}: old {figures['old']:.2f} s, new {figures['new']:.2f} s, new/old {ratio:.3f} "
                  f"(goal <= 1.10): {'ok' if ratio <= 1.1 else 'MISSED'}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--old-rev", default=None, help="commit for (c)'s baseline")
    p.add_argument("--repeats", type=int, default=5, help="runs per side in (c)")
    p.add_argument("--sections", default="a,b,c")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="(b): output megapixels")
    p.add_argument("--jobs", default="prepare_data,upscale", help="the jobs (a) and (c) measure")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    sections = set(args.sections.split(","))
    try:
        if "a" in sections:
            section_a(work, args.small, args.large, args.num_cpus, args.jobs.split(","))
        if "b" in sections:
            section_b(args.sizes)
        if "c" in sections:
            section_c(work, args.small, args.num_cpus, args.old_rev, args.repeats, args.jobs.split(","))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
