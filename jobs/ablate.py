"""The paper's ablations (Tables 2-4) at small scale, with the pixel backbone, on Ray.

    python -m jobs.ablate [--size tiny|small|medium|large] [--out runs/ablate] [--seed 0]
        [--set section.field=value ...] [--runner auto|ray|local] [--cpus-per-run N]
        [--gpus-per-run G] [--address ...] [--dry-run]

Data: the natural images shipped with scikit-image. Training crops come from 13 of them,
the test crops from three others (chelsea, coffee, rocket), all degraded x4 with the Real-ESRGAN
second-order pipeline of `pipeline.degrade` (seeded by (seed, sample_id)).

Runs (the `pixel-small` preset plus the size's overrides plus `--set`):
  stage 1  sr_flow (ours), noise (X_1 = N(0, I)), noised_lr (X_1 = LR + sigma N(0, I));
           the last two get the LR concatenated as condition (Table 2);
  stage 2  from the sr_flow stage-1 weights, shared by every stage-2 run:
           hrcl / cd / hr consistency (Table 3), fast-slow n_fast 1, 4, 8, N-interval 4, 18, 50,
           slow only (Table 4); "hrcl" is fast-slow (4), the paper's default, in both tables.
A run is the trainer's own stage loop (`flowsr.trainer.run_stage`, as `jobs.train` runs it on
each worker), then `pipeline.evaluation.evaluate_pairs` on the test crops at 1 and 4 steps. With a cluster (`--address`, or `--runner ray`) each run is one Ray
task and stage-2 tasks start when the shared stage-1 model is done; on one machine the runs go
one after the other in this process. Every run sees the same batches and the same time draws
(common random numbers), so the tables compare methods, not seeds.

OUT/ gets tables.md (the three tables, the paper's numbers beside ours, and whether each
claim's direction reproduced), table2.csv, table3.csv, table4.csv, results.json (every metric,
timings, claims), config.json and models/<run>/ (checkpoints `flowsr.checkpoint.load_for_inference`
reads).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from flowsr.config import FlowSRConfig, apply_overrides, preset
from flowsr.seeds import seeded_generator
from jobs.common import add_ray_args, job_main, using_ray
from pipeline.ablation_report import TABLES, claims, table_rows, tables_markdown
from pipeline.degrade import degrade
from pipeline.report import write_csv

TRAIN_IMAGES = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
                "camera", "brick", "grass", "gravel", "coins", "moon", "clock", "cell")
TEST_IMAGES = ("chelsea", "coffee", "rocket")
SCALE = 4
EVAL_STEPS = (1, 4)
DEGRADATION = "realesrgan_x4 (pipeline.degrade)"
TEST_SEED_OFFSET = 1_000_003  # test crops are degraded with seed + this, never seen in training
PROGRESS_REPORTS = 5  # progress lines per run
RUNNERS = ("auto", "ray", "local")


# ---- sizes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationSize:
    """What a size changes: the network, the batches, the run lengths and the data."""

    overrides: Tuple[str, ...]  # on top of the pixel-small preset
    stage1_steps: int
    stage2_steps: int
    pool_crops: int  # degraded training pairs, HR crops of pool_hr pixels
    pool_hr: int
    test_crops_per_image: int
    test_hr: int


SIZES = {
    # smoke test: seconds
    "tiny": AblationSize(("model.pixel_channels=[8,16]", "data.patch_size=32", "optim.batch_size=4",
                          "optim.warmup_steps=1"), 3, 2, 8, 64, 1, 32),
    # the default: this 2-core CPU, within the hour (see results.json["seconds"])
    "small": AblationSize(("model.pixel_channels=[16,32,64]", "data.patch_size=32", "optim.batch_size=8",
                           "optim.warmup_steps=20"), 1000, 400, 384, 128, 4, 128),
    # one GPU, tens of minutes
    "medium": AblationSize(("model.pixel_channels=[32,64,128]", "data.patch_size=64", "optim.batch_size=32",
                            "optim.warmup_steps=100", "optim.lr=5e-4"), 6000, 3000, 4096, 128, 8, 128),
    # one GPU per run, hours: closer to the paper's batch and patch
    "large": AblationSize(("model.pixel_channels=[64,128,256]", "model.pixel_layers_per_block=2",
                           "data.patch_size=128", "optim.batch_size=16", "optim.warmup_steps=500",
                           "optim.lr=2e-4"), 10000, 20000, 16384, 256, 16, 256),
}

# ---- runs -----------------------------------------------------------------------------------------
STAGE1_RUNS = {"sr_flow": {}, "noise": {"model.flow_source": "noise"},
               "noised_lr": {"model.flow_source": "noised_lr"}}
STAGE2_RUNS = {
    "hrcl": {},  # fast-slow (4) with L_hrcl: the paper's method
    "cd": {"loss.consistency": "cd"},
    "hr": {"loss.consistency": "hr"},
    "fast_slow_1": {"schedule.n_fast": 1},
    "fast_slow_8": {"schedule.n_fast": 8},
    "n_interval_4": {"schedule.sampler": "n_interval", "schedule.n_intervals": 4},
    "n_interval_18": {"schedule.sampler": "n_interval", "schedule.n_intervals": 18},
    "n_interval_50": {"schedule.sampler": "n_interval", "schedule.n_intervals": 50},
    "slow_only": {"schedule.sampler": "slow_only"},
}
SHARED_STAGE1 = "sr_flow"


def _override_strings(values: Dict) -> List[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def base_config(size: str, overrides: Sequence[str] = ()) -> FlowSRConfig:
    """pixel-small + the size's overrides + the user's, named `ablate-<size>`."""
    if size not in SIZES:
        raise ValueError(f"unknown size: {size!r} (choose from {', '.join(SIZES)})")
    s = SIZES[size]
    cfg = apply_overrides(preset("pixel-small"), [*s.overrides, f"optim.stage1_steps={s.stage1_steps}",
                                                  f"optim.stage2_steps={s.stage2_steps}", *overrides])
    return dataclasses.replace(cfg, name=f"ablate-{size}")


def run_configs(base: FlowSRConfig) -> Dict[str, Tuple[int, FlowSRConfig]]:
    """{run name: (stage, config)} of every run."""
    runs = {name: (1, apply_overrides(base, _override_strings(o))) for name, o in STAGE1_RUNS.items()}
    runs.update({name: (2, apply_overrides(base, _override_strings(o))) for name, o in STAGE2_RUNS.items()})
    return runs


# ---- data -----------------------------------------------------------------------------------------
def load_image(name: str) -> List[np.ndarray]:
    """uint8 HxWx3 RGB image(s) of `skimage.data.<name>` (gray repeated; both stereo views)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    images = list(image[:2]) if name == "stereo_motorcycle" else [image]
    return [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else np.ascontiguousarray(im[..., :3])
            for im in images]


def _crops(image: np.ndarray, size: int, n: int, rng: Optional[np.random.Generator]) -> List[Tuple[int, int]]:
    """`n` crop origins (multiples of SCALE): random with `rng`, else an even grid."""
    h, w = (image.shape[0] - size) // SCALE, (image.shape[1] - size) // SCALE
    if rng is not None:
        return [(int(rng.integers(0, h + 1)) * SCALE, int(rng.integers(0, w + 1)) * SCALE) for _ in range(n)]
    side = math.ceil(math.sqrt(n))
    grid = [(round(i * h / max(side - 1, 1)) * SCALE, round(j * w / max(side - 1, 1)) * SCALE)
            for i in range(side) for j in range(side)]
    return grid[:n]


def make_pairs(names: Sequence[str], hr_size: int, n: int, seed: int, *, random: bool) -> List[Dict]:
    """{"sample_id", "hr", "lr"} pairs (uint8 arrays): `n` crops spread over the images."""
    images = [(f"{name}/{k}", im) for name in names for k, im in enumerate(load_image(name))]
    rng = np.random.default_rng(seed) if random else None
    per_image = [n // len(images) + (i < n % len(images)) for i in range(len(images))]
    pairs = []
    for (name, image), count in zip(images, per_image):
        for y, x in _crops(image, hr_size, count, rng):
            hr = np.ascontiguousarray(image[y:y + hr_size, x:x + hr_size])
            sid = f"{name}@{y},{x}"
            lr, _ = degrade(hr, seed=seed, sample_id=sid, scale=SCALE)
            pairs.append({"sample_id": sid, "hr": hr, "lr": lr})
    return pairs


def build_data(size: AblationSize, seed: int) -> Dict:
    """{"train": pool rows as PNG bytes (the `flowsr.data.collate` row format), "test": pairs}."""
    from pipeline.schema import encode_png

    pool = make_pairs(TRAIN_IMAGES, size.pool_hr, size.pool_crops, seed, random=True)
    test = make_pairs(TEST_IMAGES, size.test_hr, size.test_crops_per_image * len(TEST_IMAGES),
                      seed + TEST_SEED_OFFSET, random=False)
    train = {"sample_id": np.asarray([p["sample_id"] for p in pool]),
             "hr": np.asarray([encode_png(p["hr"]) for p in pool], dtype=object),
             "lr": np.asarray([encode_png(p["lr"]) for p in pool], dtype=object)}
    return {"train": train, "test": test}


# ---- one run --------------------------------------------------------------------------------------
def row_batches(train: Dict, batch_size: int, seed: int):
    """The trainer's `batches(epoch)` over the in-memory training pairs: each epoch one
    permutation drawn from (seed, epoch) alone, so every run sees the same batches."""
    import torch

    def batches(epoch: int):
        n = len(train["sample_id"])
        order = np.resize(torch.randperm(n, generator=seeded_generator(seed, "rows", epoch)).numpy(), max(n, batch_size))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {k: v[rows] for k, v in train.items()}
    return batches


def _read_dir(directory: str, skip: Sequence[str] = ()) -> Dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            if os.path.relpath(path, directory) in skip:
                continue
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


def _write_dir(files: Dict[str, bytes], directory: str) -> str:
    for rel, data in files.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return directory


def run_config(cfg: FlowSRConfig, stage: int, seed: int) -> FlowSRConfig:
    """`cfg` as one ablation run trains it: seeded by `seed`, a loss reading and a checkpoint
    every 1/PROGRESS_REPORTS of the run (the last one is the run's model), no validation."""
    from flowsr.trainer import stage_steps

    total = stage_steps(cfg, stage)
    every = max(1, total // PROGRESS_REPORTS)
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, seed=seed, log_every=every, checkpoint_every=every, val_every=total + 1, fail_at_step=-1))


def train_and_evaluate(name: str, stage: int, cfg_dict: Dict, data: Dict, seed: int,
                       init_files: Optional[Dict[str, bytes]] = None, threads: int = 1,
                       metrics: Sequence[str] = ()) -> Tuple[Dict, Dict[str, bytes]]:
    """Train one run from scratch (stage 1) or from `init_files` (stage 2) with the trainer's own
    stage loop (`flowsr.trainer.run_stage`: the same optimisers, schedules and draws as
    `jobs.train`), then evaluate it on the test pairs at EVAL_STEPS. Returns (result, checkpoint
    files {relative path: bytes}, without the optimiser state)."""
    import torch

    from flowsr.checkpoint import STATE_NAME, load_for_inference
    from flowsr.metrics import MetricSuite
    from flowsr.trainer import LocalSession, run_stage, stage_steps
    from pipeline.evaluation import evaluate_pairs

    torch.set_num_threads(threads)
    cfg = run_config(FlowSRConfig.from_dict(cfg_dict), stage, seed)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init (diffusers draws from the global generator): scoped here
        session = LocalSession(os.path.join(tmp, "checkpoints"), device=device)
        init = _write_dir(init_files, os.path.join(tmp, "init")) if stage == 2 else None
        run_stage(cfg, stage, session, row_batches(data["train"], cfg.optim.batch_size, seed), init_from=init)
        train_seconds = time.perf_counter() - start
        losses = [r["loss"] for r in session.reports]
        print(f"[ablate] {name}: {cfg.train.checkpoint_every * len(losses)} steps, loss "
              f"{' -> '.join(f'{v:.4f}' for v in losses)} ({train_seconds:.0f}s)", flush=True)
        files = _read_dir(session.checkpoints[-1], skip=(STATE_NAME,))
        backbone, _ = load_for_inference(session.checkpoints[-1], device=device)
        test = data["test"]
        result = evaluate_pairs(backbone, [(p["lr"], p["hr"]) for p in test], EVAL_STEPS, scale=SCALE,
                                suite=MetricSuite(metrics, device=str(device), crop_border=SCALE), seed=seed,
                                ids=[p["sample_id"] for p in test])
    return {"run": name, "stage": stage, "steps": stage_steps(cfg, stage), "mean": result["mean"],
            "per_image": [{k: v for k, v in e.items() if k != "images"} for e in result["per_image"]],
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - start, "device": str(device)}, files


# ---- scheduling -----------------------------------------------------------------------------------
def run_all(base: FlowSRConfig, data: Dict, seed: int, *, local: bool, cpus_per_run: Optional[float] = None,
            gpus_per_run: float = 0, metrics: Sequence[str] = (), log=print) -> Tuple[Dict, Dict]:
    """Every run; stage-2 runs start from the shared stage-1 model. Returns ({run: result},
    {run: checkpoint files}). `local` runs them one after the other in this process; otherwise
    each run is a Ray task with `cpus_per_run` CPUs. Either way a run uses `cpus_per_run` torch
    threads (default 1: these small convolutions gain little from a second thread, and on a
    loaded machine two threads cost 5x the CPU time of one, measured here)."""
    runs = run_configs(base)
    cpus_per_run = cpus_per_run or 1
    threads = max(1, int(cpus_per_run))
    results, files = {}, {}

    def record(result, ckpt):
        results[result["run"]] = result
        files[result["run"]] = ckpt
        m = result["mean"]
        log(f"[ablate] {result['run']:>14}: {result['seconds']:7.1f}s  loss {result['loss_first']:.4f} -> "
            f"{result['loss_last']:.4f}  PSNR 1-step {m['1-step']['psnr']:.2f}  4-step {m['4-step']['psnr']:.2f}")

    if local:
        for name, (stage, cfg) in runs.items():
            init = files[SHARED_STAGE1] if stage == 2 else None
            record(*train_and_evaluate(name, stage, cfg.to_dict(), data, seed, init, threads, metrics))
        return results, files

    import ray

    task = ray.remote(train_and_evaluate).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, num_returns=2)
    data_ref = ray.put(data)
    pending = {}
    for name, (stage, cfg) in runs.items():
        if stage == 1:
            pending[name] = task.remote(name, 1, cfg.to_dict(), data_ref, seed, None, threads, metrics)
    stage1_files = pending[SHARED_STAGE1][1]
    for name, (stage, cfg) in runs.items():
        if stage == 2:
            pending[name] = task.remote(name, 2, cfg.to_dict(), data_ref, seed, stage1_files, threads, metrics)
    by_ref = {refs[0]: name for name, refs in pending.items()}
    waiting = list(by_ref)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        name = by_ref[done[0]]
        record(ray.get(done[0]), ray.get(pending[name][1]))
    return results, files


# ---- the job --------------------------------------------------------------------------------------
def use_ray(runner: str, address: Optional[str]) -> bool:
    """auto: Ray tasks when a cluster address is given (or $RAY_ADDRESS), else this process —
    on one small machine the runs gain nothing from Ray, and a local Ray's workers run at
    niceness 15, so other load on the machine starves them."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner: {runner!r} (choose from {', '.join(RUNNERS)})")
    return runner == "ray" or (runner == "auto" and bool(address or os.environ.get("RAY_ADDRESS")))


def ablate(size: str = "small", out: str = "runs/ablate", *, seed: int = 0, overrides: Sequence[str] = (),
           runner: str = "auto", cpus_per_run: Optional[float] = None, gpus_per_run: float = 0,
           address: Optional[str] = None, log=print) -> Dict:
    """Run every ablation of `size`, write the tables into `out`, return the results dict."""
    from flowsr.metrics import MetricSuite

    start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    local = not use_ray(runner, address)
    base = base_config(size, overrides)
    if gpus_per_run:
        base = apply_overrides(base, ["train.use_gpu=true"])
    os.makedirs(out, exist_ok=True)
    suite = MetricSuite(("lpips",), crop_border=SCALE)  # what of LPIPS can be computed here
    metrics = list(suite.available)
    data = build_data(SIZES[size], seed)
    log(f"[ablate] size {size}: {len(data['train']['sample_id'])} training pairs, {len(data['test'])} test pairs, "
        f"degradation {DEGRADATION}; LPIPS {suite.status()['lpips']}")
    with using_ray(address) if not local else contextlib.nullcontext():
        results, files = run_all(base, data, seed, local=local, cpus_per_run=cpus_per_run,
                                 gpus_per_run=gpus_per_run, metrics=metrics, log=log)
    for name, ckpt in files.items():
        _write_dir(ckpt, os.path.join(out, "models", name))
    claim_rows = claims(results, metrics)
    bicubic = results[SHARED_STAGE1]["mean"]["bicubic"]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    header = (f"## FlowSR ablations, size {size} (seed {seed})\n\n"
              f"Pixel backbone `{base.model.pixel_channels}`, patch {base.data.patch_size}, batch "
              f"{base.optim.batch_size}, stage 1 {base.optim.stage1_steps} steps, stage 2 {base.optim.stage2_steps} "
              f"steps; {len(data['test'])} test crops of {SIZES[size].test_hr}px from skimage "
              f"{', '.join(TEST_IMAGES)}, degraded with {DEGRADATION}; PSNR / SSIM on Y, border {SCALE}. "
              f"LPIPS: {suite.status()['lpips']}. Bicubic: PSNR {bicubic['psnr']:.2f}, SSIM {bicubic['ssim']:.4f}. "
              f"Runner {'local (this process)' if local else 'Ray tasks'}; wall time {seconds / 60:.1f} min "
              f"(this process's CPU time {cpu_seconds / 60:.1f} min), "
              f"1-min load average {load_start[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
              f"on {os.cpu_count()} CPUs.")
    text = tables_markdown(results, claim_rows, header)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(text)
    for key, (_, spec, paper_keys) in TABLES.items():
        headers, raw, _ = table_rows(spec, results, paper_keys)
        write_csv(os.path.join(out, f"{key}.csv"), headers, raw)
    summary = {"size": size, "seed": seed, "config": base.to_dict(), "size_spec": dataclasses.asdict(SIZES[size]),
               "degradation": DEGRADATION, "metrics_status": suite.status(), "results": results,
               "claims": claim_rows, "seconds": seconds, "cpu_seconds": cpu_seconds,
               "runner": "local" if local else "ray",
               "load_average": {"start": load_start, "end": os.getloadavg()}, "cpus": os.cpu_count(),
               "tables_md": os.path.join(out, "tables.md")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"size": size, "seed": seed, "overrides": list(overrides), "config": base.to_dict()}, f, indent=2)
    log(text)
    return summary


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="small", choices=sorted(SIZES),
                   help="ablation scale: how many steps and images each run gets")
    p.add_argument("--out", default="runs/ablate",
                   help="output folder: one sub-folder per run, tables and report")
    p.add_argument("--seed", type=int, default=0,
                   help="seed shared by every run (data, init, noise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override for every run (on top of pixel-small and the size)")
    p.add_argument("--runner", default="auto", choices=RUNNERS,
                   help="ray: one Ray task per run; local: one run after the other in this process; "
                        "auto: ray when --address / $RAY_ADDRESS is set, else local")
    p.add_argument("--cpus-per-run", type=float, default=None,
                   help="CPUs (and torch threads) per run (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0, help="GPUs per Ray task (fractions pack runs)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their configs, run nothing")
    add_ray_args(p)


def run(args) -> int:
    base = base_config(args.size, args.overrides)  # a bad --set: one line, exit 2 (run_job)
    if args.dry_run:
        plan = {name: {"stage": stage, "config": cfg.to_dict()} for name, (stage, cfg) in run_configs(base).items()}
        print(json.dumps({"size": dataclasses.asdict(SIZES[args.size]), "runs": plan}, indent=2))
        return 0
    ablate(args.size, args.out, seed=args.seed, overrides=args.overrides, runner=args.runner,
           cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, address=args.address)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_main("ablate", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
