"""Two-stage FlowSR training on Ray Train (glue): config -> datasets -> one TorchTrainer per stage.

    python -m jobs.train --config tiny|pixel-small|paper|cfg.json [--set section.field=value ...] \\
        --data SHARDS_URI [--val-data URI] --stage 1|2|all --storage-path URI --name NAME \\
        [--num-workers N] [--use-gpu] [--address ray://... | http://...] [--dry-run]

Scaling from one GPU to many nodes is `--num-workers N` (global batch `optim.batch_size` is split
over the workers). The per-worker loop is `flowsr.trainer.run_stage`; this file adapts it to Ray
Train (`RaySession`) and builds the trainers.

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
import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, Optional, Sequence

import pyarrow.fs as pafs

from flowsr.config import FlowSRConfig, apply_overrides, resolve
from flowsr.memory import estimate_training_memory, memory_report
from jobs.common import add_ray_args, config_or_exit, init_ray, resolve_fs
from pipeline import output as out
from pipeline.fingerprint import checkpoint_digest

STAGES = {"1": (1,), "2": (2,), "all": (1, 2)}
INGEST_MIN_SPARE_CPUS = 1  # CPUs beside the workers' for Ray Data's read tasks to get their own


# ---- storage ---------------------------------------------------------------------------------
def is_remote(uri: str) -> bool:
    """True for any URI (file:// included): those go through pyarrow, paths through the OS."""
    return "://" in uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if is_remote(uri) else os.path.join(uri, *parts)


def run_uri(storage_path: str, name: str) -> str:
    return join(storage_path if is_remote(storage_path) else os.path.abspath(storage_path), name)


def write_text(uri: str, text: str) -> None:
    fs, path = resolve_fs(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def exists(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory between a local path and a URI (either way)."""
    src_fs, src_path = resolve_fs(src)
    dst_fs, dst_path = resolve_fs(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


# ---- Ray Train adapter -----------------------------------------------------------------------
class RaySession:
    """`flowsr.trainer.Session` on Ray Train V2: rank and device from the train context, resume
    from `ray.train.get_checkpoint()`, checkpoints through `ray.train.report` (a barrier that
    every rank calls), fault-injection markers in the run directory."""

    def __init__(self, run: str, after_report=None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run, self.after_report = run, after_report

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step{metrics['step']:07d}")
        if self.after_report is not None:
            self.after_report()

    def claim_failure(self, stage, step):
        marker = join(self.run, f"fault_injected_stage{stage}_step{step}")
        if exists(marker):
            return False
        write_text(marker, "")
        return True


def _metrics_dir(run: str):
    """(local directory for rank 0's metrics, sync-to-storage callable or None). Remote run
    directories get a local mirror, downloaded first so a resumed run can truncate it."""
    uri = join(run, "metrics")
    if not is_remote(uri):
        return uri, None
    local = tempfile.mkdtemp(prefix="flowsr-metrics-")
    if exists(uri):
        copy_tree(uri, local)
    return local, lambda: copy_tree(local, uri)


def train_loop_per_worker(config: Dict) -> None:
    """One Ray Train worker: rebuild the config, read this worker's shard, run the stage."""
    import ray.train
    import torch

    from flowsr.trainer import run_stage
    from jobs.common import setup_logging

    setup_logging()
    cfg = FlowSRConfig.from_dict(config["flowsr"])
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    metrics_dir, sync = _metrics_dir(config["run"]) if rank == 0 else (None, None)
    session = RaySession(config["run"], after_report=sync)
    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int):
        return epoch_batches(shard, cfg, epoch, rank, session.world_size)

    val_rows = None
    if rank == 0 and config["has_val"]:
        val = ray.train.get_dataset_shard("val")
        val_rows = next(iter(val.iter_batches(batch_size=cfg.train.val_images, batch_format="numpy")), None)
    init = config.get("init_from")
    with (init.as_directory() if init is not None else contextlib.nullcontext(None)) as init_dir:
        run_stage(cfg, config["stage"], session, batches, val_rows=val_rows, init_from=init_dir,
                  metrics_dir=metrics_dir)
    if sync is not None:
        sync()


def epoch_batches(shard, cfg: FlowSRConfig, epoch: int, rank: int, world_size: int):
    """One epoch of a worker's row batches: rows pass through a shuffle buffer of
    `data.shuffle_buffer_rows` rows seeded by (seed, epoch, rank), on top of the file order
    shuffled per epoch by `load_datasets` (shards hold consecutive crops of the same photos: a
    buffer of a few batches would still train on one photo at a time)."""
    from flowsr.seeds import stream_seed

    return shard.iter_batches(batch_size=cfg.optim.batch_size // world_size, batch_format="numpy",
                              drop_last=True, local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows,
                              local_shuffle_seed=stream_seed(cfg.train.seed, "rows", epoch, rank) % 2 ** 31)


# ---- driver ----------------------------------------------------------------------------------
def worker_resources(cfg: FlowSRConfig) -> Dict[str, float]:
    """Logical resources the training workers take together."""
    t = cfg.train
    return {"CPU": float(t.num_workers * t.cpus_per_worker), "GPU": float(t.num_workers if t.use_gpu else 0)}


def check_resources(cfg: FlowSRConfig, cluster: Dict[str, float], can_grow: bool) -> None:
    """Fail fast when the training workers cannot all be placed on a cluster that cannot grow
    (the embedded local Ray); on a cluster that may autoscale, say what is missing and go on."""
    need = worker_resources(cfg)
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0)}
    if not short:
        return
    what = ", ".join(f"{need:g} {k} (the cluster has {have:g})" for k, (need, have) in short.items())
    fix = ("lower --num-workers or train.cpus_per_worker, or run on a larger cluster (--address)")
    if not can_grow:
        raise ValueError(f"{cfg.train.num_workers} training workers need {what}: {fix}")
    print(f"jobs.train: {cfg.train.num_workers} workers need {what}; waiting for the cluster to "
          f"scale up ({fix})", file=sys.stderr, flush=True)


def ingest_cpus(cfg: FlowSRConfig, cluster: Dict[str, float]) -> Optional[float]:
    """Logical CPUs of each Ray Data read task feeding training: Ray Data's default (None: one CPU)
    when the cluster has a CPU to spare beside the workers, else 0. With every CPU held by a
    worker, one-CPU read tasks would never be scheduled and training would wait for its data
    forever; the reads are light (Parquet rows of PNG bytes: the workers decode and crop), so
    sharing the workers' CPUs costs little."""
    spare = cluster.get("CPU", 0.0) - worker_resources(cfg)["CPU"]
    return None if spare >= INGEST_MIN_SPARE_CPUS else 0


def load_datasets(cfg: FlowSRConfig, data_uri: str, val_uri: Optional[str] = None,
                  read_cpus: Optional[float] = None, first_epoch: int = 0) -> Dict:
    """{"train": ..., "val": ...} Ray Datasets of the pair shards, reduced to the columns training
    reads; with `data.caption_source=table` the captions come from the joined caption table.
    `read_cpus`: logical CPUs of each read task (`ingest_cpus`; None: Ray Data's default).

    Global shuffle, streaming: the training shards are read in an order shuffled on every pass
    (Ray Data's file shuffle, reseeded per execution from a seed of (train.seed, `first_epoch`)),
    with row order preserved after that so the order is reproducible; each worker's rows then go
    through a shuffle buffer of `data.shuffle_buffer_rows` (`epoch_batches`). A full
    `random_shuffle` or `randomize_block_order` would hold the whole dataset before the first
    batch: not at 10^8 pairs."""
    import ray.data
    from ray.data import FileShuffleConfig

    from flowsr.data import TRAIN_COLUMNS
    from flowsr.seeds import stream_seed

    files = FileShuffleConfig(seed=stream_seed(cfg.train.seed, "files", first_epoch) % 2 ** 31,
                              reseed_after_execution=True)

    def read_parquet(uri: str, columns, shuffle=None):
        if read_cpus is None:
            return ray.data.read_parquet(uri, columns=columns, shuffle=shuffle)
        # Ray Data's V2 Parquet source lists the files in a task of its own that always asks for
        # one CPU; the V1 source runs listing and reading as one operator that takes `num_cpus`
        context = ray.data.DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            return ray.data.read_parquet(uri, columns=columns, num_cpus=read_cpus, shuffle=shuffle)
        finally:
            context.use_datasource_v2 = v2

    def read(uri: str, shuffle=None):
        if cfg.data.caption_source == "shards":
            return read_parquet(uri, list(TRAIN_COLUMNS), shuffle)
        if not cfg.data.caption_table:
            raise ValueError("data.caption_source=table needs data.caption_table (a caption table URI)")
        from pipeline.caption import join_captions

        images = [c for c in TRAIN_COLUMNS if not c.endswith("_caption")]
        joined = join_captions(read_parquet(uri, images, shuffle), cfg.data.caption_table, num_cpus=read_cpus)
        return joined.select_columns(list(TRAIN_COLUMNS))

    datasets = {"train": read(data_uri, files)}
    datasets["train"].context.execution_options.preserve_order = True
    if val_uri:
        datasets["val"] = read(val_uri).limit(cfg.train.val_images)
    for ds in datasets.values():
        # workers report progress as training steps; Ray Data's per-operator bars, redrawn in
        # the workers' log streams, would only bury those lines
        ds.context.enable_progress_bars = False
    return datasets


def completed_checkpoint(stage_run: str, stage: int, total: int):
    """The last checkpoint of a Ray Train run that reached `total` steps of `stage`, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(stage_run)
    except RuntimeError:  # no such run, or no checkpoint snapshot yet
        return None
    metrics = result.metrics or {}
    if result.checkpoint is not None and metrics.get("stage") == stage and metrics.get("step", 0) >= total:
        return result.checkpoint
    return None


def resume_epoch(stage_run: str, stage: int) -> int:
    """The epoch a resumed stage continues with: one after its last report's (0 for a new run)."""
    from ray.train import Result

    try:
        metrics = Result.from_path(stage_run).metrics or {}
    except RuntimeError:  # no such run yet
        return 0
    return int(metrics.get("epoch", -1)) + 1 if metrics.get("stage") == stage else 0


def fit_stage(cfg: FlowSRConfig, stage: int, datasets: Dict, run: str, init_from=None):
    """Run (or resume, or skip when complete) one stage; returns its final ray.train.Checkpoint."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flowsr.trainer import stage_steps

    done = completed_checkpoint(join(run, f"stage{stage}"), stage, stage_steps(cfg, stage))
    if done is not None:
        return done
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"flowsr": cfg.to_dict(), "stage": stage, "run": run, "init_from": init_from,
                           "has_val": "val" in datasets},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(storage_path=run, name=f"stage{stage}",
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit().checkpoint


def _local_file(uri: str, prefix: str) -> str:
    """A local path of a file that may live at a URI (downloaded when remote)."""
    if not is_remote(uri):
        return uri
    fs, path = resolve_fs(uri)
    local = os.path.join(tempfile.mkdtemp(prefix=prefix), os.path.basename(path))
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


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
    out: Dict[str, str] = {"run_dir": run}
    for s in stages:
        if s == 2 and previous is None:
            previous = completed_checkpoint(join(run, "stage1"), 1, cfg.optim.stage1_steps)
            if previous is None:
                raise ValueError(f"stage 2 needs a finished stage 1 in {run} (or --init-from CHECKPOINT)")
        datasets = load_datasets(cfg, data_uri, val_uri, read_cpus=ingest_cpus(cfg, cluster),
                                 first_epoch=resume_epoch(join(run, f"stage{s}"), s))
        previous = fit_stage(cfg, s, datasets, run, init_from=previous)
        out[f"stage{s}_checkpoint"] = (previous.path if not is_remote(run) else
                                       previous.to_directory(tempfile.mkdtemp(prefix=f"flowsr-{name}-stage{s}-")))
        for key, file in (("metrics_csv", f"stage{s}.csv"), ("loss_curve", f"stage{s}_loss.png")):
            uri = join(run, "metrics", file)
            out[f"stage{s}_{key}"] = _local_file(uri, f"flowsr-{name}-") if exists(uri) else None
    out["checkpoint"] = out[f"stage{stages[-1]}_checkpoint"]
    out["metrics_csv"] = out[f"stage{stages[-1]}_metrics_csv"]
    return out


# ---- run record: a rerun resumes only the same training --------------------------------------
# How a run executes, not what it computes: these may change between a run and its resumption.
EXECUTION_FIELDS = ("name", "train.num_workers", "train.use_gpu", "train.cpus_per_worker",
                    "train.checkpoint_every", "train.val_every", "train.val_images", "train.log_every",
                    "train.keep_checkpoints", "train.max_failures", "train.fail_at_step")


def _flatten(d: Dict, prefix: str = "") -> Dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def data_identity(uri: Optional[str]) -> Optional[str]:
    """Digest of a shard folder's listing (each Parquet file's relative name and size)."""
    if not uri:
        return None
    fs, root = resolve_fs(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        files = [(os.path.basename(root), info.size)]
    elif info.type == pafs.FileType.Directory:
        files = sorted((os.path.relpath(i.path, root), i.size)
                       for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                       and not i.base_name.startswith((".", "_")))
    else:
        raise FileNotFoundError(f"training data not found: {uri}")
    import hashlib

    return hashlib.sha256("\n".join(f"{n}|{size}" for n, size in files).encode()).hexdigest()


def train_record(cfg: FlowSRConfig, data_uri: str, val_uri: Optional[str] = None,
                 init_from: Optional[str] = None) -> Dict:
    """The run record of a training run: every result-defining config field and the data."""
    params = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in EXECUTION_FIELDS}
    params["data"] = data_identity(data_uri)  # validation data changes no weight: recorded, not compared
    return out.run_record("train", {"data": data_uri, "val_data": val_uri}, params,
                          checkpoint_digest(init_from))


def check_resume(run: str, cfg: FlowSRConfig, data_uri: str, val_uri: Optional[str] = None,
                 init_from: Optional[str] = None, *, write: bool = True) -> bool:
    """Record this run's config and data, or refuse a rerun of `run` with others (RunMismatch).

    Writes config.json on the first run only; with `write=False` only compares with a record
    already there (nothing is written). Returns True when the run resumes."""
    fs, root = resolve_fs(run)
    if not write:
        if out.read_json(fs, f"{root}/{out.RUN_FILE}") is None:
            return False
        return out.check_run_record(fs, root, train_record(cfg, data_uri, val_uri, init_from), label=run,
                                    advice="rerun with the recorded config and data, or use a new --name")
    fs.create_dir(root, recursive=True)
    resumed = out.check_run_record(fs, root, train_record(cfg, data_uri, val_uri, init_from), label=run,
                                   advice="rerun with the recorded config and data, or use a new --name")
    if fs.get_file_info(f"{root}/config.json").type == pafs.FileType.NotFound:
        out.write_bytes_atomic(fs, f"{root}/config.json", cfg.to_json().encode())
    return resumed


# ---- CLI -------------------------------------------------------------------------------------
def add_train_options(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_options(p)
    return p


def config_from_args(args) -> FlowSRConfig:
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu is not None:
        overrides.append(f"train.use_gpu={json.dumps(args.use_gpu)}")
    return config_or_exit(lambda: apply_overrides(resolve(args.config), overrides))


def run_from_args(args) -> int:
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
        raise SystemExit("--data is required (unless --dry-run)")
    from jobs.common import quiet_console, setup_logging

    setup_logging()
    try:
        with quiet_console():  # Ray's known noise and repeated worker lines off the console
            result = train(cfg, args.data, storage_path=args.storage_path, name=name, stage=args.stage,
                           val_uri=args.val_data, address=args.address, init_from=args.init_from)
    except (out.OutputError, FileNotFoundError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
