"""Stage-1 and stage-2 training steps (paper Sec. 4.3, Eq. 10), pure over explicit models.

A batch is a dict: `hr` and `lr` (B, 3, H, W) in [-1, 1], LR already resized to the HR size,
and optionally `hr_caption` / `lr_caption` (lists of str). The student is a backbone; teacher
and EMA target are frozen velocity models passed in explicitly.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import flow
from .backbones.common import ema_update, unwrap
from .config import FlowSRConfig
from .discriminator import discriminator_logits, noise_latent
from .draws import RowSubset, StepDraws, to_device
from .losses import (ImageDistance, consistency_loss, discriminator_hinge_loss, flow_loss,
                     generator_adversarial_loss, hr_regularised_consistency_loss, quality_alignment_loss)
from .schedules import sample_flow_time


@dataclass
class Models:
    """Everything a step touches. `teacher`, `target`, `disc`, `iqa` are stage-2 only."""

    student: object  # a backbone: velocity, encode, decode, trainable_parameters, ...
    distance: ImageDistance
    teacher: Optional[object] = None
    target: Optional[object] = None
    disc: Optional[torch.nn.Module] = None  # DiscriminatorHeads (possibly DDP-wrapped)
    iqa: Optional[object] = None  # ClipIQA


# ---- pieces ----------------------------------------------------------------------------------
def flow_source(z_lr: torch.Tensor, cfg: FlowSRConfig, draws=None):
    """(X_1, cond): the t = 1 end of the flow and the network's extra condition.
    sr_flow: X_1 = LR (ours); noise: X_1 = N(0, I); noised_lr: X_1 = LR + sigma * N(0, I) — the two
    Table-2 alternatives get the LR concatenated as condition (pixel backbone only)."""
    kind = cfg.model.flow_source
    if kind == "sr_flow":
        return z_lr, None
    eps = _draws(draws, len(z_lr), z_lr.device).normal("source", z_lr.shape[1:]).to(z_lr.dtype)
    if kind == "noise":
        return eps, z_lr
    if kind == "noised_lr":
        return z_lr + cfg.model.noised_lr_sigma * eps, z_lr
    raise ValueError(f"unknown flow source: {kind!r}")


def _draws(draws, n: int, device) -> StepDraws:
    """`draws` as StepDraws: a torch.Generator (or None) becomes one batch's draws seeded from it."""
    if isinstance(draws, (StepDraws, RowSubset)):
        return draws
    return StepDraws.from_generator(draws, n, device)


def quality_captions(batch: Dict):
    """(c_pos, c_neg) of Eq. 9: the HR and LR captions, each non-empty. An empty caption would make
    the IQA term a constant (log 2 when both are empty) with zero gradient, silently."""
    pos, neg = batch.get("hr_caption"), batch.get("lr_caption")
    n = len(batch["hr"])
    for name, texts in (("hr_caption", pos), ("lr_caption", neg)):
        if texts is None or len(texts) != n or any(not str(c).strip() for c in texts):
            raise ValueError(f"loss.lambda_iqa > 0 needs a non-empty {name} for every sample (caption the "
                             f"data with jobs.caption, or set loss.lambda_iqa=0)")
    return list(pos), list(neg)


def _autocast(cfg: FlowSRConfig, device: torch.device):
    if cfg.train.mixed_precision != "bf16":
        return contextlib.nullcontext()  # (torch.autocast refuses a device type it has no kernels for: meta)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _chunks(batch: Dict, draws: StepDraws, n_chunks: int) -> List[Tuple[Dict, StepDraws]]:
    """The batch and its draws cut into `n_chunks` accumulation chunks of equal size."""
    n = len(batch["hr"])
    if n % n_chunks:
        raise ValueError(f"batch of {n} does not split into {n_chunks} accumulation chunks")
    if len(draws) != n:
        raise ValueError(f"draws for {len(draws)} rows given with a batch of {n}")
    size = n // n_chunks
    return [({k: v[i * size:(i + 1) * size] for k, v in batch.items()}, draws.chunk(i * size, (i + 1) * size))
            for i in range(n_chunks)]


def _no_sync(modules, active: bool):
    stack = contextlib.ExitStack()
    if active:
        for m in modules:
            if isinstance(m, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())
    return stack


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int = 0, schedule: str = "constant",
          floor: float = 0.1) -> float:
    """Linear warm-up to `base_lr`, then constant (the paper states a constant lr) or, with
    `schedule="cosine"`, a cosine decay from `base_lr` to `floor * base_lr` at `total_steps`."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if schedule == "cosine":
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule != "constant":
        raise ValueError(f"unknown lr schedule: {schedule!r} (choose from constant, cosine)")
    return lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _ddp_modules(models: Models):
    return [m for m in (models.student.student_forward, models.disc) if m is not None]


def _optimizer_step(optimizer, params, max_grad_norm: float) -> torch.Tensor:
    """Clip, step, zero; the gradient norm stays on the device (no host sync)."""
    params = list(params)
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.zeros((), device=params[0].device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach().float()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---- metrics on the device -------------------------------------------------------------------
class StepMetrics(Mapping):
    """Sums and counts of the metrics of one or more steps, kept on the device.

    Each entry is (sum of per-sample values, number of samples): a loss term's global mean is
    the sum over every rank of its sums over the sum of its counts, whatever rows each rank had.
    Reading a value (`m["loss"]`, `dict(m)`) syncs with the device once; `read(across_ranks=
    True)` all-reduces every entry over the ranks in one collective. Every rank holds the same keys (a term a rank
    has no rows for is there with count 0), so the collective pairs them up.
    """

    def __init__(self, weights: Optional[Dict[str, float]] = None):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, float] = {}
        self.weights = dict(weights or {})  # Eq. 10 weights: "loss" = sum of weight x term mean
        self._values: Optional[Dict[str, float]] = None

    def add(self, name: str, total: torch.Tensor, count: float) -> None:
        total = total.detach().float().reshape(())
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0.0) + count
        self._values = None

    def merge(self, other: "StepMetrics") -> "StepMetrics":
        for name in other.sums:
            self.add(name, other.sums[name], other.counts[name])
        self.weights.update(other.weights)
        return self

    def read(self, across_ranks: bool = False) -> Dict[str, float]:
        """Every metric's mean as floats: one host sync; with `across_ranks`, after one all-reduce
        of every sum and count (a collective: every rank calls it)."""
        if self._values is not None and not across_ranks:
            return self._values
        keys = sorted(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k] for k in keys])
        packed = torch.cat([sums, torch.tensor([self.counts[k] for k in keys], device=sums.device)])
        if across_ranks and _world_size() > 1:
            dist.all_reduce(packed)
        host = packed.tolist()  # the one sync
        means = {k: host[i] / host[len(keys) + i] for i, k in enumerate(keys) if host[len(keys) + i] > 0}
        if self.weights:
            means = {"loss": sum(w * means[k] for k, w in self.weights.items() if k in means), **means}
        if not across_ranks:
            self._values = means
        return means

    def __getitem__(self, key: str) -> float:
        return self.read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.read())

    def __len__(self) -> int:
        return len(self.read())


# ---- stage 1: SR flow (Eq. 7) ----------------------------------------------------------------
def flow_times(draws, cfg: FlowSRConfig) -> torch.Tensor:
    """t of L_flow for each row of `draws` (slow grid, `flow_t1_share` of them at t = 1)."""
    s = cfg.schedule
    return draws.host("t_flow", lambda n, g: sample_flow_time(n, s.n_slow, s.flow_t1_share, g))


def stage1_losses(batch: Dict, models: Models, cfg: FlowSRConfig, draws=None) -> Dict[str, torch.Tensor]:
    """{"flow": (B,)}: t on the slow grid, x_hat_HR = decode(f_theta(x_t, t)) against HR."""
    student = models.student
    hr, lr = batch["hr"], batch["lr"]
    draws = _draws(draws, len(hr), hr.device)
    with torch.no_grad():
        z_hr, z_lr = student.encode(hr), student.encode(lr)
    x1, cond = flow_source(z_lr, cfg, draws)
    t = flow_times(draws, cfg)
    z_t = flow.interpolate(z_hr, x1, t)
    sr = student.decode(flow.consistency(z_t, t, student.velocity(z_t, t, cond)))
    return {"flow": flow_loss(sr, hr, models.distance)}


def stage1_step(batch: Dict, models: Models, optimizer, cfg: FlowSRConfig, draws=None) -> StepMetrics:
    """One optimiser step of stage 1 over this worker's rows of the global batch (with gradient
    accumulation over `optim.grad_accum` chunks). The objective is the global batch mean of L_flow:
    each rank's sum times world size / global batch, so DDP's gradient average is exact."""
    device = batch["hr"].device
    draws = _draws(draws, len(batch["hr"]), device)
    world, n_global = _world_size(), draws.global_batch
    chunks = _chunks(batch, draws, cfg.optim.grad_accum)
    metrics = StepMetrics({"flow": 1.0})
    for i, (chunk, chunk_draws) in enumerate(chunks):
        with _no_sync(_ddp_modules(models), i < len(chunks) - 1), _autocast(cfg, device):
            per_sample = stage1_losses(chunk, models, cfg, chunk_draws)["flow"].float()
        (per_sample.sum() * (world / n_global)).backward()
        metrics.add("flow", per_sample.sum(), len(per_sample))
    metrics.add("grad_norm", _optimizer_step(optimizer, models.student.trainable_parameters(),
                                             cfg.optim.max_grad_norm), 1)
    return metrics


# ---- stage 2: consistency SR flow (Eq. 3-6, 8-10) --------------------------------------------
TERMS = ("flow", "cons", "adv", "iqa")


def loss_weights(cfg: FlowSRConfig, models: Models) -> Dict[str, float]:
    """Eq. 10's weight of each term this run trains (a term with weight 0 or no model is left out)."""
    lo = cfg.loss
    weights = {"flow": 1.0, "cons": lo.lambda_cd}
    if models.disc is not None and lo.lambda_adv > 0:
        weights["adv"] = lo.lambda_adv
    if models.iqa is not None and lo.lambda_iqa > 0:
        weights["iqa"] = lo.lambda_iqa
    if cfg.schedule.flow_fraction <= 0:
        weights.pop("flow")
    if cfg.schedule.flow_fraction >= 1:
        weights.pop("cons")
    return weights


def expected_rows(term: str, cfg: FlowSRConfig, n_global: int) -> float:
    """How many rows of a global batch a term covers on average: the normaliser of its sum, so
    that a step's objective is an unbiased estimate of Eq. 10 at any batch size (exactly the
    per-term batch means when n_global x flow_fraction is a whole number, as at batch 16)."""
    f = cfg.schedule.flow_fraction
    return {"flow": n_global * f, "cons": n_global * (1 - f)}.get(term, float(n_global))


def stage2_losses(batch: Dict, models: Models, cfg: FlowSRConfig, pair_sampler, draws=None):
    """Per-sample losses of one stage-2 batch and the student's one-step HR latents.

    Rows are flow rows (L_flow, t on the slow grid) or consistency rows ((t, t') from
    `pair_sampler`) by their position in the stream of rows (`flowsr.draws`). One student forward
    covers [x_t of the flow rows, x_t' and x_hat_t of the consistency rows] so DDP sees a single
    forward. Returns (losses, z_fake, z_real): "flow" over the flow rows, "cons" over the
    consistency rows, "adv" / "iqa" over every row (its one-step prediction from x_t or x_t');
    z_fake (detached) and z_real in the batch's row order, for the discriminator step.
    """
    student, teacher, target, dist_fn = models.student, models.teacher, models.target, models.distance
    mode = cfg.loss.consistency
    use_iqa = models.iqa is not None and cfg.loss.lambda_iqa > 0
    c_pos, c_neg = quality_captions(batch) if use_iqa else (None, None)  # fail before any forward
    hr, lr = batch["hr"], batch["lr"]
    n, device = hr.shape[0], hr.device
    draws = _draws(draws, n, device)
    flow_pos, cons_pos = draws.flow_rows(cfg.schedule.flow_fraction)
    n_flow, n_cons = len(flow_pos), len(cons_pos)
    order = to_device(torch.tensor(flow_pos + cons_pos, dtype=torch.long), device)
    hr, lr = hr.index_select(0, order), lr.index_select(0, order)  # flow rows first
    with torch.no_grad():
        z_hr, z_lr = student.encode(hr), student.encode(lr)
    x1, cond = flow_source(z_lr, cfg, draws.subset(flow_pos + cons_pos))
    flow_draws, cons_draws = draws.subset(flow_pos), draws.subset(cons_pos)

    t_flow = flow_times(flow_draws, cfg)
    z_flow = flow.interpolate(z_hr[:n_flow], x1[:n_flow], t_flow)
    t, t_prime = cons_draws.host("t_pairs", pair_sampler.sample)
    z_hr_c, x1_c = z_hr[n_flow:], x1[n_flow:]
    cond_c = None if cond is None else cond[n_flow:]
    z_t_prime = flow.interpolate(z_hr_c, x1_c, t_prime)
    target_img = None
    with torch.no_grad():  # Eq. 3: one Euler step of the frozen teacher from t' to t
        z_hat_t = flow.euler_step(z_t_prime, teacher.velocity(z_t_prime, t_prime, cond_c), t_prime, t) \
            if n_cons else z_t_prime
        if mode in ("hrcl", "cd") and n_cons:
            v_target = target.velocity(z_hat_t, t, cond_c)
            target_img = student.decode(flow.consistency(z_hat_t, t, v_target))

    x_in = torch.cat([z_flow, z_t_prime, z_hat_t])
    t_in = torch.cat([t_flow, t_prime, t])
    cond_in = None if cond is None else torch.cat([cond[:n_flow], cond_c, cond_c])
    f = flow.consistency(x_in, t_in, student.velocity(x_in, t_in, cond_in))
    img = student.decode(f)
    img_flow, img_t_prime, img_t = img[:n_flow], img[n_flow:n], img[n:]

    losses = {"flow": flow_loss(img_flow, hr[:n_flow], dist_fn) if n_flow else img.new_zeros(0)}
    if mode == "hrcl":
        losses["cons"] = hr_regularised_consistency_loss(img_t_prime, target_img, img_t, hr[n_flow:], dist_fn) \
            if n_cons else img.new_zeros(0)
    elif mode == "cd":
        losses["cons"] = consistency_loss(img_t_prime, target_img, dist_fn) if n_cons else img.new_zeros(0)
    else:  # "hr": the HR-regularisation term alone (Table 3, w/ L_hr)
        losses["cons"] = dist_fn(img_t, hr[n_flow:]) if n_cons else img.new_zeros(0)
    z_fake, img_fake = f[:n], img[:n]  # one-step-style predictions from x_t / x_t', in `order`
    all_rows = draws.subset(flow_pos + cons_pos)
    if models.disc is not None and cfg.loss.lambda_adv > 0:
        z_noisy, ts = _noised(z_fake, student.noise_scheduler, cfg, all_rows, "adv")
        heads = unwrap(models.disc)
        heads.requires_grad_(False)
        try:
            losses["adv"] = generator_adversarial_loss(discriminator_logits(student, heads, z_noisy, ts))
        finally:
            heads.requires_grad_(True)
    if use_iqa:
        c_pos, c_neg = ([c[i] for i in flow_pos + cons_pos] for c in (c_pos, c_neg))
        losses["iqa"] = quality_alignment_loss(models.iqa.image_features(img_fake), models.iqa.text_features(c_pos),
                                               models.iqa.text_features(c_neg), cfg.loss.iqa_temperature)
    back = to_device(torch.tensor(_inverse(flow_pos + cons_pos), dtype=torch.long), device)
    return losses, z_fake.detach().index_select(0, back), z_hr.index_select(0, back)


def _inverse(order: List[int]) -> List[int]:
    inverse = [0] * len(order)
    for i, j in enumerate(order):
        inverse[j] = i
    return inverse


def _noised(z: torch.Tensor, scheduler, cfg: FlowSRConfig, draws, name: str):
    """z noised at discriminator times drawn per row (stream `name`)."""
    ts = draws.integers(f"{name}_t", cfg.loss.disc_t_min, cfg.loss.disc_t_max)
    noise = draws.normal(f"{name}_noise", z.shape[1:]).to(z.dtype)
    return noise_latent(z, scheduler, ts, noise), ts


def total_loss(losses: Dict[str, torch.Tensor], cfg: FlowSRConfig,
               normalisers: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """Eq. 10: L_flow + lambda_cd L_hrcl + lambda_adv L_adv + lambda_iqa L_iqa. Each term is its
    per-sample sum over `normalisers[term]` (default: the batch mean of the term)."""
    weights = {"flow": 1.0, "cons": cfg.loss.lambda_cd, "adv": cfg.loss.lambda_adv, "iqa": cfg.loss.lambda_iqa}
    total = None
    for k, v in losses.items():
        if v.numel() == 0:
            continue
        norm = normalisers[k] if normalisers is not None else v.numel()
        term = weights[k] * v.float().sum() / norm
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no loss term has a row in this batch")
    return total


def discriminator_losses(z_real: torch.Tensor, z_fake: torch.Tensor, models: Models, cfg: FlowSRConfig,
                         draws=None) -> torch.Tensor:
    """Eq. 8 hinge loss per sample; backbone features under no_grad, heads trainable."""
    sched = models.student.noise_scheduler
    draws = _draws(draws, len(z_real), z_real.device)
    with torch.no_grad():
        zr, tr = _noised(z_real, sched, cfg, draws, "d_real")
        zf, tf = _noised(z_fake, sched, cfg, draws, "d_fake")
        feats = models.student.discriminator_features(torch.cat([zr, zf]), torch.cat([tr, tf]))
    logits = models.disc([f.detach() for f in feats])
    real, fake = logits.chunk(2)
    return discriminator_hinge_loss(real, fake)


def stage2_step(batch: Dict, models: Models, optimizers, cfg: FlowSRConfig, pair_sampler,
                draws=None) -> StepMetrics:
    """One stage-2 step: student (Eq. 10) update, EMA target update, discriminator update.
    `optimizers` = (student_optimizer, disc_optimizer or None). Each term is normalised by its
    expected rows in the global batch (`expected_rows`) and scaled by the world size, so the
    gradient DDP averages is that of Eq. 10 over the global batch, however it is divided."""
    opt_g, opt_d = optimizers
    device = batch["hr"].device
    draws = _draws(draws, len(batch["hr"]), device)
    world, n_global = _world_size(), draws.global_batch
    weights = loss_weights(cfg, models)
    norms = {k: expected_rows(k, cfg, n_global) / world for k in TERMS}
    chunks = _chunks(batch, draws, cfg.optim.grad_accum)
    metrics = StepMetrics(weights)
    fakes, reals = [], []
    for i, (chunk, chunk_draws) in enumerate(chunks):
        with _no_sync(_ddp_modules(models), i < len(chunks) - 1), _autocast(cfg, device):
            losses, z_fake, z_real = stage2_losses(chunk, models, cfg, pair_sampler, chunk_draws)
            losses = {k: v for k, v in losses.items() if k in weights}
            loss = total_loss(losses, cfg, norms)
        loss.backward()
        fakes.append(z_fake)
        reals.append(z_real)
        for k in weights:
            v = losses[k].float()
            metrics.add(k, v.sum(), v.numel())
    metrics.add("grad_norm", _optimizer_step(opt_g, models.student.trainable_parameters(),
                                             cfg.optim.max_grad_norm), 1)
    ema_update(models.target.parameters(), models.student.trainable_parameters(), cfg.schedule.ema_decay)
    if models.disc is not None and opt_d is not None and cfg.loss.lambda_adv > 0:
        for i, ((_, chunk_draws), zr, zf) in enumerate(zip(chunks, reals, fakes)):
            with _no_sync([models.disc], i < len(chunks) - 1), _autocast(cfg, device):
                d_loss = discriminator_losses(zr, zf, models, cfg, chunk_draws).float()
            (d_loss.sum() * (world / n_global)).backward()
            metrics.add("disc", d_loss.sum(), d_loss.numel())
        _optimizer_step(opt_d, list(models.disc.parameters()), cfg.optim.max_grad_norm)
    return metrics
