"""CPU scaling of the Ray Data stages: pairs/s with a local Ray of 1 and of 2 (or more) CPUs.

prepare_data (Real-ESRGAN pairs, template captions) and jobs.caption (template backend over
`--caption-shards` copies of the shards it wrote, see `caption_corpus`), each run at every CPU
count in turn, for several rounds, so that other load on the machine hits all counts alike; the load average is printed with every run. Besides pairs/s
it prints the degrade-task parallelism (task seconds / wall seconds, from Ray's task timeline):
the number of CPUs the stage kept busy, which other load does not bias the way it biases rates.
Then prepare_data's Ray overhead: CPU seconds per pair of the whole Ray job (task workers,
driver, Ray's daemons) against a bare single-process loop calling the same stage functions.

    python benchmarks/bench_scaling.py [--files 32] [--crops 4] [--patch 256] [--cpus 1 2] [--rounds 2]
        [--caption-shards 64]

Goals (docs/DESIGN.md): >= 1.7x the 1-CPU rate at 2 CPUs; Ray overhead <= 10% CPU per pair.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_degrade import bare_loop, measure, write_sources  # noqa: E402
from jobs.prepare_data import PrepareConfig  # noqa: E402


def task_parallelism(since: float, name: str) -> float:
    """Seconds of the tasks whose operator name contains `name`, started after `since`, per wall
    second from the first start to the last end."""
    import ray

    events = [e for e in ray.timeline() if e.get("ph") == "X" and name in str(e.get("cat", ""))
              and e["ts"] / 1e6 >= since]
    if not events:
        return float("nan")
    busy = sum(e["dur"] for e in events) / 1e6
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e6
    return busy / span if span > 0 else float("nan")


@contextlib.contextmanager
def local_ray(n_cpus: int, pin: bool):
    """A local Ray of `n_cpus` logical CPUs; with `pin`, it and this driver run on `n_cpus` cores
    only (CPU affinity, inherited by Ray's daemons and workers), so that "1 CPU" is one core of
    the machine for all of Ray's processes, not one worker with the driver, the raylet and the
    shard writer on the other cores."""
    import ray

    from jobs.common import init_ray

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = pin and 0 < n_cpus <= len(cores)
    if pinned:
        os.sched_setaffinity(0, cores[:n_cpus])
    try:
        init_ray(None, num_cpus=n_cpus, object_store_memory=1 << 29)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if pinned:
            os.sched_setaffinity(0, cores)


def caption_corpus(pairs: Path, folder: Path, shards: int) -> Path:
    """`shards` pair shards for the caption stage: the columns the template captioner reads
    (sample_id, degradation) from `pairs`, repeated under new ids, with 1-byte hr / lr (never
    read by it). The prepared pairs alone are caption work of well under a second."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.caption_tables import pair_shard_paths
    from pipeline.schema import PAIR_SCHEMA

    base = pa.concat_tables(pq.read_table(p) for p in pair_shard_paths(str(pairs))).select(PAIR_SCHEMA.names)
    folder.mkdir(parents=True)
    for k in range(shards):
        ids = [hashlib.sha1(f"{k}|{i}".encode()).hexdigest()[:16] for i in range(base.num_rows)]
        table = base.set_column(0, "sample_id", pa.array(ids, pa.string()))
        for name in ("hr", "lr"):
            table = table.set_column(table.schema.get_field_index(name), PAIR_SCHEMA.field(name),
                                     pa.array([b"x"] * base.num_rows, pa.binary()))
        pq.write_table(table.cast(PAIR_SCHEMA), folder / f"part-{k:05d}.parquet")
    return folder


def run_once(work: Path, n_cpus: int, tag: str, args) -> Dict[str, float]:

    from jobs import caption as C
    from jobs import prepare_data as P
    from pipeline.caption import CaptionConfig

    with local_ray(n_cpus, args.pin):
        def config(source: str, out: str):
            return P.PrepareConfig(input=str(work / source), output=str(work / out), patch_size=args.patch,
                                   crops_per_image=args.crops, shard_rows=64, captioner="template")

        P.prepare(config("warmup", f"warm-{tag}"))  # starts the task workers
        since, load = time.time(), os.getloadavg()[0]
        start = time.perf_counter()
        pairs = P.prepare(config("in", f"pairs-{tag}"))["pairs_written"]
        prepare_rate = pairs / (time.perf_counter() - start)
        parallel = task_parallelism(since, "degrade_units")
        shards = caption_corpus(work / f"pairs-{tag}" / "shards", work / f"caption-in-{tag}", args.caption_shards)
        start = time.perf_counter()
        captioned = C.regenerate(C.RegenerateConfig(shards=str(shards), output=str(work / f"captions-{tag}"),
                                                    caption=CaptionConfig(backend="template")))["captioned"]
        caption_rate = captioned / (time.perf_counter() - start)
    return {"prepare": prepare_rate, "parallel": parallel, "caption": caption_rate, "load": load}


def upscale_rates(work: Path, args) -> None:
    """jobs.upscale (tiny SD shapes, 128^2 -> 512^2) and jobs.evaluate (1 step on as many of the
    prepared pairs, PSNR/SSIM) with their default single model actor, at each CPU count: images/s
    of the whole job (for upscale: listing, probe, decode, upscale, encode, write)."""

    from benchmarks.bench_upscale import make_checkpoint, make_inputs
    from jobs.evaluate import evaluate
    from jobs.upscale import upscale_corpus
    from pipeline.evaluation import EvalConfig
    from pipeline.upscale_config import UpscaleJobConfig

    ckpt = make_checkpoint(str(work / "upscale-model"), sd21=False)
    make_inputs(str(work / "upscale-in"), args.upscale_images)
    rates: Dict[int, List[float]] = {n: [] for n in args.cpus}
    eval_rates: Dict[int, List[float]] = {n: [] for n in args.cpus}
    for r in range(args.rounds):
        for n in args.cpus:
            with local_ray(n, args.pin):
                out = work / f"upscale-out-{r}-{n}"
                start = time.perf_counter()
                done = upscale_corpus(UpscaleJobConfig(input=str(work / "upscale-in"), output=str(out),
                                                       checkpoint=ckpt, scale=4, tile=0, color_fix="none",
                                                       format="png"))["ok"]
                rates[n].append(done / (time.perf_counter() - start))
                start = time.perf_counter()
                pairs = next(work.glob("pairs-*/shards"))  # written by the prepare_data runs above
                scored = evaluate(EvalConfig(data=str(pairs), out=str(work / f"eval-{r}-{n}"), checkpoint=ckpt,
                                             steps=(1,), metrics=(), limit=args.upscale_images,
                                             report_images=0))["n_images"]
                eval_rates[n].append(scored / (time.perf_counter() - start))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  round {r} {n} CPU(s): upscale {rates[n][-1]:6.2f} img/s, evaluate {eval_rates[n][-1]:6.2f} "
                  f"pairs/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    base = args.cpus[0]
    for label, got in (("upscale img/s", rates), ("evaluate (1 step, PSNR/SSIM) pairs/s", eval_rates)):
        print(f"{label}: " + ", ".join(f"{n} CPU(s) best {max(got[n]):.2f} ({max(got[n]) / max(got[base]):.2f}x)"
                                       for n in args.cpus), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--caption-shards", type=int, default=64,
                   help="shards of the caption benchmark, each as many rows as the prepared pairs")
    p.add_argument("--upscale-images", type=int, default=0,
                   help="also time jobs.upscale over this many 128^2 images (tiny SD shapes) at each CPU count")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not confine each local Ray (and this driver) to as many cores as it has CPUs")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import cv2

    cv2.setNumThreads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    try:
        write_sources(work / "in", args.files)
        # the warm-up starts a task worker per CPU of the largest count (a unit of files per
        # worker, twice over), so that no count pays Ray's worker start-up inside its timing
        write_sources(work / "warmup", 2 * max(args.cpus) * PrepareConfig.files_per_task)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.files} files x "
              f"{args.crops} crops = {args.files * args.crops} pairs of {args.patch}->{args.patch // 4}", flush=True)
        runs: Dict[int, List[Dict[str, float]]] = {n: [] for n in args.cpus}
        for r in range(args.rounds):
            for n in args.cpus:
                res = run_once(work, n, f"{r}-{n}", args)
                runs[n].append(res)
                print(f"  round {r} {n} CPU(s): prepare_data {res['prepare']:7.2f} pairs/s (degrade tasks "
                      f"kept {res['parallel']:.2f} CPUs busy), caption template {res['caption']:8.1f} rows/s; "
                      f"load average {res['load']:.1f}", flush=True)
        base = args.cpus[0]
        for key, label in (("prepare", "prepare_data pairs/s"), ("caption", "caption (template) rows/s")):
            best = {n: max(x[key] for x in runs[n]) for n in args.cpus}
            med = {n: statistics.median(x[key] for x in runs[n]) for n in args.cpus}
            print(f"{label}: " + ", ".join(
                f"{n} CPU(s) best {best[n]:.2f} median {med[n]:.2f} ({best[n] / best[base]:.2f}x best, "
                f"{med[n] / med[base]:.2f}x median)" for n in args.cpus), flush=True)
        print("degrade-task parallelism (CPUs kept busy): " + ", ".join(
            f"{n} CPU(s) {statistics.median(x['parallel'] for x in runs[n]):.2f}" for n in args.cpus), flush=True)
        if args.upscale_images:
            upscale_rates(work, args)
        if not args.skip_overhead:
            overhead(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def overhead(work: Path, args) -> None:
    """CPU seconds per pair: the Ray job at 1 CPU (all processes) vs the bare loop; all-in on the
    `--files` corpus, and marginal (the job on a corpus three times as large, minus the first,
    per extra pair) with the fixed cost per job that leaves."""
    from jobs import prepare_data as P

    def config(source: str, out: str):
        return P.PrepareConfig(input=str(work / source), output=str(work / out), patch_size=args.patch,
                               crops_per_image=args.crops, shard_rows=64)

    write_sources(work / "in-3x", 3 * args.files, start=args.files)  # distinct from "in"
    bare = measure(lambda: bare_loop(config("in", "bare")))
    with local_ray(1, pin=False):
        P.prepare(config("warmup", "warm-overhead"))
        job = measure(lambda: P.prepare(config("in", "ray-overhead"))["pairs_written"])
        big = measure(lambda: P.prepare(config("in-3x", "ray-overhead-3x"))["pairs_written"])
    bare_ms, job_ms = (m["cpu"] / m["pairs"] * 1e3 for m in (bare, job))
    marginal_ms = (big["cpu"] - job["cpu"]) / (big["pairs"] - job["pairs"]) * 1e3
    fixed_s = job["cpu"] - marginal_ms * job["pairs"] / 1e3
    print(f"Ray overhead at 1 CPU: bare loop {bare_ms:.1f} CPU-ms/pair; Ray job on {job['pairs']} pairs "
          f"{job_ms:.1f} CPU-ms/pair (task workers {job['workers'] / job['pairs'] * 1e3:.1f}, driver "
          f"{job['driver'] / job['pairs'] * 1e3:.1f}, Ray daemons {job['daemons'] / job['pairs'] * 1e3:.1f}): "
          f"{(job_ms / bare_ms - 1) * 100:+.1f}% CPU per pair all-in; marginal (on {big['pairs']} pairs) "
          f"{marginal_ms:.1f} CPU-ms/pair, {(marginal_ms / bare_ms - 1) * 100:+.1f}% per pair, plus {fixed_s:.1f} "
          f"CPU-s per job; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
