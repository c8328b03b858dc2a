"""FlowSR training on Ray Train: the worker loop's adapter (`RaySession`), the data feeding it,
one `TorchTrainer` per stage, and the run record that lets a rerun resume only the same training.

The per-worker loop itself is `flowsr.trainer.run_stage`; `jobs/train.py` is the command line.
Run directory layout: see `jobs/train.py`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from typing import Dict, Optional

import pyarrow.fs as pafs

from flowsr.config import FlowSRConfig
from pipeline import output as out
from pipeline.fingerprint import checkpoint_digest
from pipeline.logs import setup_logging
from pipeline.storage import copy_tree, exists, is_local, join_uri, resolve_fs, write_text

INGEST_MIN_SPARE_CPUS = 1  # CPUs beside the workers' for Ray Data's read tasks to get their own


def run_uri(storage_path: str, name: str) -> str:
    """The run directory `name` under `storage_path` (a local path made absolute, or a URI)."""
    return join_uri(storage_path if "://" in storage_path else os.path.abspath(storage_path), name)


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
        marker = join_uri(self.run, f"fault_injected_stage{stage}_step{step}")
        if exists(marker):
            return False
        write_text(marker, "")
        return True


def _metrics_dir(run: str):
    """(local directory for rank 0's metrics, sync-to-storage callable or None). Remote run
    directories get a local mirror, downloaded first so a resumed run can truncate it."""
    uri = join_uri(run, "metrics")
    if is_local(uri):
        return resolve_fs(uri)[1], None
    local = tempfile.mkdtemp(prefix="flowsr-metrics-")
    if exists(uri):
        copy_tree(uri, local)
    return local, lambda: copy_tree(local, uri)


def train_loop_per_worker(config: Dict) -> None:
    """One Ray Train worker: rebuild the config, read this worker's shard, run the stage."""
    import ray.train
    import torch

    from flowsr.trainer import run_stage

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
        from pipeline.caption_tables import join_captions

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

    done = completed_checkpoint(join_uri(run, f"stage{stage}"), stage, stage_steps(cfg, stage))
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
