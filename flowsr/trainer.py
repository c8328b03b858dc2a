"""The per-worker training loop of one FlowSR stage (paper Sec. 4.3), independent of Ray.

Stage 1 trains the student on the SR-flow loss (Eq. 7). Stage 2 starts from a stage-1 checkpoint
(frozen teacher, student init, EMA target) and adds the consistency, GAN and IQA terms (Eq. 10).

A `Session` supplies what a distributed runtime provides: rank, device, the checkpoint to resume
from and a report barrier that persists checkpoints. `jobs/train.py` implements it on Ray Train;
`LocalSession` runs the same loop in one process. The torch process group, when there is one,
is set up by the runtime; this module only wraps the trainable networks in DDP.

Randomness: a step's draws come from streams keyed by (seed, stage, step) for the whole global
batch, each rank taking its rows (`flowsr.draws`), so a run resumed from step k draws exactly what
an uninterrupted run draws after k, and one worker draws what eight do. Crops are seeded per
sample (`flowsr.data`); after a resume the data order restarts with a fresh epoch.

Host syncs: the loss terms of each step stay on the device (`StepMetrics`) and are read, with one
all-reduce across ranks, every `train.log_every` steps, at checkpoints and at validation.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ContextManager, Dict, Iterable, Iterator, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

from .backbones import PixelBackbone, SDLatentBackbone
from .build import build_stage1, build_stage2, make_optimizer
from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .config import FlowSRConfig
from .data import collate
from .metrics_log import MetricsLog, progress_text
from .sample import super_resolve
from .schedules import make_pair_sampler
from .draws import StepDraws
from .train_step import Models, StepMetrics, lr_at, set_lr, stage1_step, stage2_step

VAL_STEPS = (1, 4)  # validation PSNR of 1-step and 4-step sampling (the paper's two settings)

RowBatches = Callable[[int], Iterable[Dict]]  # epoch -> row batches (dicts of arrays, flowsr.data)

logger = logging.getLogger("flowsr.train")


class InjectedFailure(RuntimeError):
    """Raised once by worker 0 at `train.fail_at_step` (fault-tolerance tests)."""


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> ContextManager[Optional[str]]:
        """A local directory of the checkpoint to resume from, or None."""

    def report(self, metrics: Dict[str, float], checkpoint_dir: Optional[str]) -> None:
        """Barrier on every rank; persists `checkpoint_dir` (rank 0 passes it, others None)."""

    def claim_failure(self, stage: int, step: int) -> bool:
        """True the first time it is asked for (stage, step) in this run, False afterwards."""


class LocalSession:
    """One process without a runtime: resumes from `restore_dir`; each reported checkpoint is
    copied to `root/stage{S}_step{N}`."""

    rank, world_size = 0, 1

    def __init__(self, root: str, device="cpu", restore_dir: Optional[str] = None):
        self.root, self.device, self.restore_dir = root, torch.device(device), restore_dir
        self.checkpoints, self.reports = [], []

    def restore(self):
        return contextlib.nullcontext(self.restore_dir)

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = os.path.join(self.root, f"stage{metrics['stage']}_step{metrics['step']:07d}")
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)
            self.checkpoints.append(dst)

    def claim_failure(self, stage, step):
        marker = os.path.join(self.root, f"fault_injected_stage{stage}_step{step}")
        if os.path.exists(marker):
            return False
        os.makedirs(self.root, exist_ok=True)
        open(marker, "w").close()
        return True


# ---- models of a stage -----------------------------------------------------------------------
def stage_steps(cfg: FlowSRConfig, stage: int) -> int:
    if stage == 1:
        return cfg.optim.stage1_steps
    if stage == 2:
        return cfg.optim.stage2_steps
    raise ValueError(f"unknown stage: {stage!r} (1 | 2)")


def stage_lr(cfg: FlowSRConfig, stage: int) -> float:
    """The student's base learning rate of `stage`."""
    return cfg.optim.stage2_lr if stage == 2 and cfg.optim.stage2_lr is not None else cfg.optim.lr


def build_stage(cfg: FlowSRConfig, stage: int, device, init_from: Optional[str] = None):
    """(models, (student optimiser, discriminator optimiser or None)) of `stage`; stage 2 needs
    `init_from`, a stage-1 checkpoint directory."""
    if stage == 1:
        models = build_stage1(cfg, device)
        return models, (make_optimizer(models.student.trainable_parameters(), cfg.optim.lr, cfg), None)
    if stage == 2:
        if init_from is None:
            raise ValueError("stage 2 starts from stage-1 weights: pass init_from (a stage-1 checkpoint)")
        models = build_stage2(cfg, device, init_from=os.path.join(init_from, "student"))
        opt_g = make_optimizer(models.student.trainable_parameters(), stage_lr(cfg, 2), cfg)
        opt_d = make_optimizer(models.disc.parameters(), cfg.optim.disc_lr, cfg) if models.disc is not None else None
        return models, (opt_g, opt_d)
    raise ValueError(f"unknown stage: {stage!r} (1 | 2)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def student_network(backbone) -> torch.nn.Module:
    """The module whose trainable parameters DDP synchronises: the LoRA-carrying UNet or the pixel net."""
    if isinstance(backbone, SDLatentBackbone):
        return backbone.unet
    if isinstance(backbone, PixelBackbone):
        return backbone.net
    raise ValueError(f"unknown backbone type: {type(backbone).__name__!r}")


def wrap_ddp(models: Models, device: torch.device) -> Models:
    """DDP over the trainable parameters only: the student's network (frozen base weights and the
    teacher / target adapters have requires_grad=False and stay out of the reducer) and the
    discriminator heads. Teacher, target and feature forwards keep using the raw modules.
    A no-op without a process group of two or more ranks."""
    if not _distributed():
        return models
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    models.student.student_forward = DDP(student_network(models.student), device_ids=ids)
    if models.disc is not None:
        models.disc = DDP(models.disc, device_ids=ids)
    return models


# ---- validation ------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (B, 3, H, W), computed on [0, 1]."""
    x, y = ((t.float().clamp(-1, 1) + 1) / 2 for t in (x, y))
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@contextlib.contextmanager
def raw_forward(backbone):
    """Run the student without its DDP wrapper (single-rank evaluation must not issue collectives)."""
    wrapped, backbone.student_forward = backbone.student_forward, None
    try:
        yield backbone
    finally:
        backbone.student_forward = wrapped


@torch.no_grad()
def validate(backbone, batch: Dict, cfg: FlowSRConfig) -> Dict[str, float]:
    """PSNR of bicubic, 1-step and 4-step SR against HR on one validation batch."""
    out = {"val_psnr_bicubic": psnr(batch["lr"], batch["hr"])}
    amp = torch.autocast(batch["hr"].device.type, dtype=torch.bfloat16,
                         enabled=cfg.train.mixed_precision == "bf16")
    with raw_forward(backbone), amp:
        for steps in VAL_STEPS:
            out[f"val_psnr_{steps}step"] = psnr(super_resolve(backbone, batch["lr"], steps), batch["hr"])
    return out


class Prefetcher:
    """`prepare(r)` for each row batch `r` of `rows`, the next one fetched and prepared in a
    background thread while the caller trains on the current one. The first fetch starts at
    construction, so it overlaps whatever the caller does next (building the models)."""

    def __init__(self, rows: Iterable[Dict], prepare: Callable[[Dict], Dict]):
        self._rows, self._prepare = iter(rows), prepare
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowsr-batches")
        self._pending = self._pool.submit(self._following)

    def _following(self) -> Optional[Dict]:
        rows = next(self._rows, None)
        return None if rows is None else self._prepare(rows)

    def __iter__(self) -> Iterator[Dict]:
        try:
            while (batch := self._pending.result()) is not None:
                self._pending = self._pool.submit(self._following)
                yield batch
        finally:
            self._pool.shutdown(wait=True)


# ---- the loop --------------------------------------------------------------------------------
def _read_window(window: StepMetrics, cfg: FlowSRConfig, stage: int, step: int, steps: int, *,
                 tick: float, started: float) -> Dict[str, float]:
    """The mean of each metric over the last `steps` steps (ending at 1-based `step`) across every
    rank: one all-reduce and one host sync. Adds the learning rate of the last step and the
    window's throughput. Raises FloatingPointError on a non-finite value."""
    metrics = window.read(across_ranks=True)
    now = time.perf_counter()  # after the sync: the device has finished the window's steps
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"non-finite stage-{stage} metrics at step {step}: {metrics}")
    o = cfg.optim
    lr = lr_at(step - 1, stage_lr(cfg, stage), o.warmup_steps, total_steps=stage_steps(cfg, stage),
               schedule=o.lr_schedule, floor=o.lr_floor)
    return {**metrics, "lr": lr, "img_per_s": steps * o.batch_size / max(now - tick, 1e-9), "elapsed_s": now - started}


def resume_point(directory: Optional[str], stage: int) -> Tuple[int, int]:
    """(first step, first epoch) of a run resumed from checkpoint `directory`; (0, 0) without one.
    The data restarts with a fresh epoch after the checkpoint's."""
    if directory is None:
        return 0, 0
    meta = read_meta(directory)
    if meta["stage"] != stage:
        raise ValueError(f"cannot resume stage {stage} from a stage-{meta['stage']} checkpoint")
    return int(meta["step"]), int(meta.get("epoch", -1)) + 1


def _optimise(batch: Dict, step: int, stage: int, models: Models, optimizers, cfg: FlowSRConfig,
              pair_sampler, draws: StepDraws) -> StepMetrics:
    """One optimiser step of `stage` at the learning rates scheduled for (0-based) `step`."""
    opt_g, opt_d = optimizers
    o = cfg.optim
    schedule = dict(total_steps=stage_steps(cfg, stage), schedule=o.lr_schedule, floor=o.lr_floor)
    set_lr(opt_g, lr_at(step, stage_lr(cfg, stage), o.warmup_steps, **schedule))
    if opt_d is not None:
        set_lr(opt_d, lr_at(step, o.disc_lr, o.warmup_steps, **schedule))
    if stage == 1:
        return stage1_step(batch, models, opt_g, cfg, draws)
    return stage2_step(batch, models, optimizers, cfg, pair_sampler, draws)


def step_draws(cfg: FlowSRConfig, stage: int, step: int, session: Session) -> StepDraws:
    """The draws of (0-based) `step` for this rank's rows of the global batch."""
    local = cfg.optim.batch_size // session.world_size
    rows = range(session.rank * local, (session.rank + 1) * local)
    return StepDraws(cfg.train.seed, stage, step, cfg.optim.batch_size, session.device, rows)


def _checkpoint(session: Session, cfg: FlowSRConfig, stage: int, step: int, epoch: int, models: Models,
                optimizers, metrics: Dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(prefix="flowsr-ckpt-") as tmp:
        if session.rank == 0:
            save_checkpoint(tmp, cfg=cfg, stage=stage, step=step, models=models, optimizers=optimizers,
                            extra={"epoch": epoch}, metrics=metrics)
        session.report({**metrics, "stage": stage, "step": step}, tmp if session.rank == 0 else None)


def run_stage(cfg: FlowSRConfig, stage: int, session: Session, batches: RowBatches, *,
              val_rows: Optional[Dict] = None, init_from: Optional[str] = None,
              metrics_dir: Optional[str] = None) -> Dict:
    """Train `stage` to its step target on this worker, resuming from the session's checkpoint.

    `batches(epoch)` yields this worker's row batches of `optim.batch_size / world_size` rows;
    every rank must get the same number per epoch. `val_rows` (rank 0): a row batch for
    validation. `metrics_dir` (rank 0): where the metrics CSV / TensorBoard / PNG go.
    Checkpoints are reported every `train.checkpoint_every` steps and at the last step.
    Returns {"stage", "step", "metrics" (last step), "csv", "loss_curve"}.
    """
    started = time.perf_counter()
    total, rank, device = stage_steps(cfg, stage), session.rank, session.device
    local_batch = cfg.optim.batch_size // session.world_size

    def epoch_batches(epoch: int) -> Prefetcher:
        prepare = functools.partial(collate, cfg=cfg.data, seed=cfg.train.seed, epoch=epoch, device=device)
        return Prefetcher(batches(epoch), prepare)

    with session.restore() as checkpoint:
        start, epoch = resume_point(checkpoint, stage)
        data = epoch_batches(epoch) if start < total else None  # reads while the models load
        models, optimizers = build_stage(cfg, stage, device, init_from)
        if checkpoint is not None:
            load_checkpoint(checkpoint, models=models, optimizers=optimizers)
    wrap_ddp(models, device)
    log = MetricsLog(metrics_dir, f"stage{stage}", start) if rank == 0 and metrics_dir else None
    val_batch = None
    if rank == 0 and val_rows is not None:
        val_batch = collate(val_rows, cfg.data, augment=False, device=device)
    s = cfg.schedule
    pair_sampler = make_pair_sampler(s.sampler, n_fast=s.n_fast, n_slow=s.n_slow, n_intervals=s.n_intervals)
    step, metrics = start, {}
    window, window_start, window_tick = StepMetrics(), start, time.perf_counter()
    loop_start = window_tick
    while step < total:
        seen = 0
        for batch in data or epoch_batches(epoch):
            seen += 1
            if rank == 0 and step + 1 == cfg.train.fail_at_step and session.claim_failure(stage, step + 1):
                raise InjectedFailure(f"train.fail_at_step={step + 1}: injected failure in worker 0, stage {stage}")
            if len(batch["hr"]) != local_batch:
                raise ValueError(f"worker batch has {len(batch['hr'])} rows, expected {local_batch}")
            window.merge(_optimise(batch, step, stage, models, optimizers, cfg, pair_sampler,
                                   step_draws(cfg, stage, step, session)))
            step += 1
            validating = step % cfg.train.val_every == 0 or step == total
            checkpointing = step % cfg.train.checkpoint_every == 0 or step == total
            if not (step % cfg.train.log_every == 0 or checkpointing or validating):
                continue
            metrics = _read_window(window, cfg, stage, step, step - window_start, tick=window_tick, started=started)
            metrics.update(epoch=epoch, resumed_from=start)
            if device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if val_batch is not None and validating:
                metrics.update(validate(models.student, val_batch, cfg))
            if log is not None:
                log.log(step, metrics)
                progress = progress_text(step - start, total - start, time.perf_counter() - loop_start, "img",
                                         cfg.optim.batch_size)
                logger.info("stage %d step %d/%d | %s | %s", stage, step, total, progress, " ".join(
                    f"{k}={v:.4g}" for k, v in metrics.items()
                    if k not in ("epoch", "resumed_from", "img_per_s", "elapsed_s")))
            if checkpointing:
                if log is not None:
                    log.flush()
                _checkpoint(session, cfg, stage, step, epoch, models, optimizers, metrics)
            window, window_start, window_tick = StepMetrics(), step, time.perf_counter()
            if step >= total:
                break
        if not seen:
            raise ValueError(f"the training data gives no full batch of {local_batch} rows per worker")
        data, epoch = None, epoch + 1
    png = log.close() if log is not None else None
    return {"stage": stage, "step": step, "metrics": metrics, "csv": log.csv_path if log else None,
            "loss_curve": png}
