"""Two-stage FlowSR training on Ray Train (glue): config -> datasets -> one TorchTrainer per stage.

    python -m jobs.train --config tiny|pixel-small|paper|cfg.json [--set section.field=value ...] \\
        --data SHARDS_URI [--val-data URI] --stage 1|2|all --storage-path URI --name NAME \\
        [--num-workers N] [--use-gpu] [--address ray://... | http://...] [--dry-run]

Scaling from one GPU to many nodes is `--num-workers N` (global batch `optim.batch_size` is split
over the workers). The per-worker loop is `flowsr.trainer.run_stage`; `pipeline.train_ray`
adapts it to Ray Train and builds the trainers; this file is the command line.

Run directory `{storage_path}/{name}` (a local path or any pyarrow URI; on a multi-node cluster
use storage every node reaches):
    config.json             the resolved config
    stage1/ stage2/         Ray Train runs; checkpoint_step*/ hold the `flowsr.checkpoint` layout
    metrics/                stage{S}.csv, stage{S}_loss.png, tb/stage{S}/ (written by rank 0)
    fault_injected_*        markers of `train.fail_at_step` (a failure is injected once)
    _run.json               run record: the resolved config and the data it trains on
Rerunning with the same storage path and name resumes each stage from its last checkpoint; a
stage that already reached its step target is skipped. A rerun must resolve to the same config
and data as the run's record (only how it runs may change: `train.num_workers`, `use_gpu`,
`cpus_per_worker` and the logging / checkpointing cadence); anything else is refused with one
line and exit status 2, before Ray starts, and config.json is never overwritten. Stage 2 starts from stage 1's final
checkpoint (or `--init-from`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, Optional, Sequence

from flowsr.config import FlowSRConfig, apply_overrides, resolve
from flowsr.memory import estimate_training_memory, memory_report
from jobs.common import add_ray_args, init_ray, job_main
from pipeline.storage import exists, is_local, join_uri, local_copy
from pipeline.train_ray import (check_resources, check_resume, completed_checkpoint, fit_stage, ingest_cpus,
                                load_datasets, resume_epoch, run_uri)

STAGES = {"1": (1,), "2": (2,), "all": (1, 2)}


def train(cfg: FlowSRConfig, data_uri: str, *, storage_path: str, name: str, stage="all",
          val_uri: Optional[str] = None, address: Optional[str] = None, init_from: Optional[str] = None) -> Dict:
    """Train `stage` (1, 2 or "all") on Ray; connects to `address` / $RAY_ADDRESS or starts a local
    Ray when none is running. Returns local paths: {"run_dir", "stage{S}_checkpoint",
    "stage{S}_metrics_csv", "stage{S}_loss_curve" per stage run, "checkpoint" and "metrics_csv"
    of the last stage} (remote files are downloaded to a temporary directory)."""
    from ray.train import Checkpoint

    if str(stage) not in STAGES:
        raise ValueError(f"unknown stage: {stage!r} (1 | 2 | all)")
    stages = STAGES[str(stage)]
    import ray

    run = run_uri(storage_path, name)
    check_resume(run, cfg, data_uri, val_uri, init_from, write=False)  # a mismatch: refused before Ray starts
    init_ray(address)
    cluster = ray.cluster_resources()
    check_resources(cfg, cluster, can_grow=bool(address or os.environ.get("RAY_ADDRESS")))
    check_resume(run, cfg, data_uri, val_uri, init_from)  # records the run once the workers can run
    previous = Checkpoint(init_from) if init_from else None
    result: Dict[str, str] = {"run_dir": run}
    for s in stages:
        if s == 2 and previous is None:
            previous = completed_checkpoint(join_uri(run, "stage1"), 1, cfg.optim.stage1_steps)
            if previous is None:
                raise ValueError(f"stage 2 needs a finished stage 1 in {run} (or --init-from CHECKPOINT)")
        datasets = load_datasets(cfg, data_uri, val_uri, read_cpus=ingest_cpus(cfg, cluster),
                                 first_epoch=resume_epoch(join_uri(run, f"stage{s}"), s))
        previous = fit_stage(cfg, s, datasets, run, init_from=previous)
        result[f"stage{s}_checkpoint"] = (
            previous.path if is_local(run) else previous.to_directory(tempfile.mkdtemp(prefix=f"flowsr-{name}-stage{s}-")))
        for key, file in (("metrics_csv", f"stage{s}.csv"), ("loss_curve", f"stage{s}_loss.png")):
            uri = join_uri(run, "metrics", file)
            result[f"stage{s}_{key}"] = local_copy(uri, f"flowsr-{name}-") if exists(uri) else None
    result["checkpoint"] = result[f"stage{stages[-1]}_checkpoint"]
    result["metrics_csv"] = result[f"stage{stages[-1]}_metrics_csv"]
    return result


# ---- CLI -------------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m jobs.train` and `flowsr train`."""
    p.add_argument("--config", default="tiny", help="preset (paper | tiny | pixel-small) or a config JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, repeatable (e.g. --set model.pretrained=DIR --set optim.lr=1e-4)")
    p.add_argument("--data", help="Parquet pair shards (path or URI)")
    p.add_argument("--val-data", default=None, help="held-out Parquet shards for validation PSNR")
    p.add_argument("--stage", default="all", choices=sorted(STAGES),
                   help="1: flow training, 2: consistency distillation from stage 1, all: both")
    p.add_argument("--storage-path", default="runs", help="where run directories go (path or URI)")
    p.add_argument("--name", default=None, help="run name (default: the config name)")
    p.add_argument("--init-from", default=None, help="stage-1 checkpoint for --stage 2 (default: this run's)")
    p.add_argument("--num-workers", type=int, default=None, help="overrides train.num_workers")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="overrides train.use_gpu")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the plan and each stage's estimated peak GPU memory per worker; "
                        "run nothing")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                   help="GPU memory of each worker: --dry-run warns for a stage estimated above it")
    add_ray_args(p)


def config_from_args(args) -> FlowSRConfig:
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu is not None:
        overrides.append(f"train.use_gpu={json.dumps(args.use_gpu)}")
    return apply_overrides(resolve(args.config), overrides)


def run(args) -> int:
    cfg = config_from_args(args)
    name = args.name or cfg.name
    if args.dry_run:
        plan = {"run_dir": run_uri(args.storage_path, name), "stages": list(STAGES[args.stage]),
                "num_workers": cfg.train.num_workers, "use_gpu": cfg.train.use_gpu,
                "per_worker_batch": cfg.optim.batch_size // cfg.train.num_workers,
                "data": args.data, "val_data": args.val_data}
        memory = {f"stage{s}": estimate_training_memory(cfg, s, cfg.train.num_workers) for s in STAGES[args.stage]}
        print(memory_report(memory, cfg, args.gpu_memory), file=sys.stderr)
        print(json.dumps({"plan": {**plan, "gpu_memory_gb": args.gpu_memory, "memory": memory},
                          "config": cfg.to_dict()}, indent=2))
        return 0
    if not args.data:
        raise ValueError("--data is required (unless --dry-run)")
    from jobs.common import quiet_console, setup_logging

    setup_logging()
    with quiet_console():  # Ray's known noise and repeated worker lines off the console
        result = train(cfg, args.data, storage_path=args.storage_path, name=name, stage=args.stage,
                       val_uri=args.val_data, address=args.address, init_from=args.init_from)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_main("train", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
