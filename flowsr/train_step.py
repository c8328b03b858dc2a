"""Stage-1 and stage-2 training steps (paper Sec. 4.3, Eq. 10), pure over explicit models.

A batch is a dict: `hr` and `lr` (B, 3, H, W) in [-1, 1], LR already resized to the HR size,
and optionally `hr_caption` / `lr_caption` (lists of str). The student is a backbone; teacher
and EMA target are frozen velocity models passed in explicitly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import flow
from .backbones.common import ema_update
from .config import FlowSRConfig
from .discriminator import discriminator_logits, noise_latent
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
def flow_source(z_lr: torch.Tensor, cfg: FlowSRConfig, generator=None):
    """(X_1, cond): the t = 1 end of the flow and the network's extra condition.
    sr_flow: X_1 = LR (ours); noise: X_1 = N(0, I); noised_lr: X_1 = LR + sigma * N(0, I) — the two
    Table-2 alternatives get the LR concatenated as condition."""
    kind = cfg.model.flow_source
    if kind == "sr_flow":
        return z_lr, None
    eps = torch.randn(z_lr.shape, generator=generator).to(z_lr.device, z_lr.dtype)
    if kind == "noise":
        return eps, z_lr
    if kind == "noised_lr":
        return z_lr + cfg.model.noised_lr_sigma * eps, z_lr
    raise ValueError(f"unknown flow source: {kind!r}")


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
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")


def _split(batch: Dict, n_chunks: int) -> List[Dict]:
    n = len(batch["hr"])
    if n % n_chunks:
        raise ValueError(f"batch of {n} does not split into {n_chunks} accumulation chunks")
    size = n // n_chunks
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n_chunks)]


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


def _optimizer_step(optimizer, params, max_grad_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else torch.tensor(0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ---- stage 1: SR flow (Eq. 7) ----------------------------------------------------------------
def stage1_losses(batch: Dict, models: Models, cfg: FlowSRConfig, generator=None) -> Dict[str, torch.Tensor]:
    """{"flow": (B,)}: t on the slow grid, x_hat_HR = decode(f_theta(x_t, t)) against HR."""
    student = models.student
    hr, lr = batch["hr"], batch["lr"]
    with torch.no_grad():
        z_hr, z_lr = student.encode(hr), student.encode(lr)
    x1, cond = flow_source(z_lr, cfg, generator)
    t = sample_flow_time(hr.shape[0], cfg.schedule.n_slow, cfg.schedule.flow_t1_share, generator).to(hr.device)
    z_t = flow.interpolate(z_hr, x1, t)
    sr = student.decode(flow.consistency(z_t, t, student.velocity(z_t, t, cond)))
    return {"flow": flow_loss(sr, hr, models.distance)}


def stage1_step(batch: Dict, models: Models, optimizer, cfg: FlowSRConfig, generator=None) -> Dict[str, float]:
    """One optimiser step of stage 1 (with gradient accumulation over `optim.grad_accum` chunks)."""
    device = batch["hr"].device
    chunks = _split(batch, cfg.optim.grad_accum)
    total = 0.0
    for i, chunk in enumerate(chunks):
        with _no_sync(_ddp_modules(models), i < len(chunks) - 1), _autocast(cfg, device):
            loss = stage1_losses(chunk, models, cfg, generator)["flow"].mean()
        (loss / len(chunks)).backward()
        total += loss.item() / len(chunks)
    grad_norm = _optimizer_step(optimizer, models.student.trainable_parameters(), cfg.optim.max_grad_norm)
    return {"loss": total, "flow": total, "grad_norm": grad_norm}


# ---- stage 2: consistency SR flow (Eq. 3-6, 8-10) --------------------------------------------
def stage2_losses(batch: Dict, models: Models, cfg: FlowSRConfig, pair_sampler, generator=None):
    """Per-sample losses of one stage-2 batch and the student's one-step HR latents.

    The first `flow_fraction` of the batch gets L_flow (t on the slow grid), the rest the
    consistency loss on (t, t') from `pair_sampler`. One student forward covers
    [x_t (flow part), x_t' and x_hat_t (consistency part)] so DDP sees a single forward.
    Returns (losses, z_fake, z_real) with z_fake detached, for the discriminator step.
    """
    student, teacher, target, dist = models.student, models.teacher, models.target, models.distance
    mode = cfg.loss.consistency
    use_iqa = models.iqa is not None and cfg.loss.lambda_iqa > 0
    c_pos, c_neg = quality_captions(batch) if use_iqa else (None, None)  # fail before any forward
    hr, lr = batch["hr"], batch["lr"]
    n = hr.shape[0]
    n_flow = int(round(n * cfg.schedule.flow_fraction))
    n_cons = n - n_flow
    with torch.no_grad():
        z_hr, z_lr = student.encode(hr), student.encode(lr)
    x1, cond = flow_source(z_lr, cfg, generator)
    device = hr.device

    t_flow = sample_flow_time(n_flow, cfg.schedule.n_slow, cfg.schedule.flow_t1_share, generator).to(device)
    z_flow = flow.interpolate(z_hr[:n_flow], x1[:n_flow], t_flow)
    t, t_prime = (x.to(device) for x in pair_sampler.sample(n_cons, generator))
    z_hr_c, x1_c = z_hr[n_flow:], x1[n_flow:]
    cond_c = None if cond is None else cond[n_flow:]
    z_t_prime = flow.interpolate(z_hr_c, x1_c, t_prime)
    with torch.no_grad():  # Eq. 3: one Euler step of the frozen teacher from t' to t
        z_hat_t = flow.euler_step(z_t_prime, teacher.velocity(z_t_prime, t_prime, cond_c), t_prime, t)
        target_img = None
        if mode in ("hrcl", "cd") and n_cons:
            v_target = target.velocity(z_hat_t, t, cond_c)
            target_img = student.decode(flow.consistency(z_hat_t, t, v_target))

    x_in = torch.cat([z_flow, z_t_prime, z_hat_t])
    t_in = torch.cat([t_flow, t_prime, t])
    cond_in = None if cond is None else torch.cat([cond[:n_flow], cond_c, cond_c])
    f = flow.consistency(x_in, t_in, student.velocity(x_in, t_in, cond_in))
    img = student.decode(f)
    img_flow, img_t_prime, img_t = img[:n_flow], img[n_flow:n], img[n:]

    losses = {}
    if n_flow:
        losses["flow"] = flow_loss(img_flow, hr[:n_flow], dist)
    if n_cons:
        if mode == "hrcl":
            losses["cons"] = hr_regularised_consistency_loss(img_t_prime, target_img, img_t, hr[n_flow:], dist)
        elif mode == "cd":
            losses["cons"] = consistency_loss(img_t_prime, target_img, dist)
        else:  # "hr": the HR-regularisation term alone (Table 3, w/ L_hr)
            losses["cons"] = dist(img_t, hr[n_flow:])
    z_fake, img_fake = f[:n], img[:n]  # one-step-style predictions from x_t / x_t'
    if models.disc is not None and cfg.loss.lambda_adv > 0:
        z_noisy, ts = noise_latent(z_fake, student.noise_scheduler, cfg.loss.disc_t_min, cfg.loss.disc_t_max, generator)
        heads = models.disc.module if hasattr(models.disc, "module") and isinstance(
            models.disc, torch.nn.parallel.DistributedDataParallel) else models.disc
        heads.requires_grad_(False)
        try:
            losses["adv"] = generator_adversarial_loss(discriminator_logits(student, heads, z_noisy, ts))
        finally:
            heads.requires_grad_(True)
    if use_iqa:
        losses["iqa"] = quality_alignment_loss(models.iqa.image_features(img_fake), models.iqa.text_features(c_pos),
                                               models.iqa.text_features(c_neg), cfg.loss.iqa_temperature)
    return losses, z_fake.detach(), z_hr


def total_loss(losses: Dict[str, torch.Tensor], cfg: FlowSRConfig) -> torch.Tensor:
    """Eq. 10: L_flow + lambda_cd L_hrcl + lambda_adv L_adv + lambda_iqa L_iqa (batch means)."""
    weights = {"flow": 1.0, "cons": cfg.loss.lambda_cd, "adv": cfg.loss.lambda_adv, "iqa": cfg.loss.lambda_iqa}
    return sum(weights[k] * v.float().mean() for k, v in losses.items())


def discriminator_losses(z_real: torch.Tensor, z_fake: torch.Tensor, models: Models, cfg: FlowSRConfig,
                         generator=None) -> torch.Tensor:
    """Eq. 8 hinge loss per sample; backbone features under no_grad, heads trainable."""
    sched = models.student.noise_scheduler
    with torch.no_grad():
        zr, tr = noise_latent(z_real, sched, cfg.loss.disc_t_min, cfg.loss.disc_t_max, generator)
        zf, tf = noise_latent(z_fake, sched, cfg.loss.disc_t_min, cfg.loss.disc_t_max, generator)
        feats = models.student.discriminator_features(torch.cat([zr, zf]), torch.cat([tr, tf]))
    logits = models.disc([f.detach() for f in feats])
    real, fake = logits.chunk(2)
    return discriminator_hinge_loss(real, fake)


def stage2_step(batch: Dict, models: Models, optimizers, cfg: FlowSRConfig, pair_sampler,
                generator=None) -> Dict[str, float]:
    """One stage-2 step: student (Eq. 10) update, EMA target update, discriminator update.
    `optimizers` = (student_optimizer, disc_optimizer or None)."""
    opt_g, opt_d = optimizers
    device = batch["hr"].device
    chunks = _split(batch, cfg.optim.grad_accum)
    metrics: Dict[str, float] = {}
    fakes, reals = [], []
    for i, chunk in enumerate(chunks):
        with _no_sync(_ddp_modules(models), i < len(chunks) - 1), _autocast(cfg, device):
            losses, z_fake, z_real = stage2_losses(chunk, models, cfg, pair_sampler, generator)
            loss = total_loss(losses, cfg)
        (loss / len(chunks)).backward()
        fakes.append(z_fake)
        reals.append(z_real)
        metrics["loss"] = metrics.get("loss", 0.0) + loss.item() / len(chunks)
        for k, v in losses.items():
            metrics[k] = metrics.get(k, 0.0) + v.float().mean().item() / len(chunks)
    metrics["grad_norm"] = _optimizer_step(opt_g, models.student.trainable_parameters(), cfg.optim.max_grad_norm)
    ema_update(models.target.parameters(), models.student.trainable_parameters(), cfg.schedule.ema_decay)
    if models.disc is not None and opt_d is not None and cfg.loss.lambda_adv > 0:
        for i, (zr, zf) in enumerate(zip(reals, fakes)):
            with _no_sync([models.disc], i < len(chunks) - 1), _autocast(cfg, device):
                d_loss = discriminator_losses(zr, zf, models, cfg, generator).mean()
            (d_loss / len(chunks)).backward()
            metrics["disc"] = metrics.get("disc", 0.0) + d_loss.item() / len(chunks)
        _optimizer_step(opt_d, list(models.disc.parameters()), cfg.optim.max_grad_norm)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"non-finite stage-2 metrics: {metrics}")
    return metrics
