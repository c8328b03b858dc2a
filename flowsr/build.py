"""Build the models of each training stage from a resolved config (real loading code only)."""
from __future__ import annotations

from typing import Optional

import torch

from .backbones import SDLatentBackbone, build_backbone
from .config import FlowSRConfig
from .discriminator import DiscriminatorHeads
from .losses import ImageDistance
from .perceptual import ClipIQA, load_lpips
from .train_step import Models


def build_distance(cfg: FlowSRConfig, device=None) -> ImageDistance:
    lpips = None
    if cfg.loss.lambda_lpips > 0:
        lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_pretrained)
        lpips = lpips.to(device) if device is not None else lpips
    return ImageDistance(lpips, cfg.loss.lambda_lpips)


def _frozen_in_bf16(cfg: FlowSRConfig, student) -> None:
    """Under bf16 mixed precision the SD backbone's frozen weights are held in bf16 (its LoRA
    adapters stay fp32): `SDLatentBackbone.hold_frozen_in`."""
    if cfg.train.mixed_precision == "bf16" and isinstance(student, SDLatentBackbone):
        student.hold_frozen_in(torch.bfloat16)


def build_stage1(cfg: FlowSRConfig, device=None) -> Models:
    student = build_backbone(cfg.model, device=device)
    _frozen_in_bf16(cfg, student)
    return Models(student=student, distance=build_distance(cfg, device))


def build_stage2(cfg: FlowSRConfig, device=None, init_from: Optional[str] = None) -> Models:
    """Student initialised from the stage-1 weights in `init_from`; the frozen teacher and the EMA
    target start as copies of it; discriminator heads and CLIP are built only here."""
    student = build_backbone(cfg.model, device=device)
    if init_from is not None:
        student.load_trainable(init_from)
    teacher = student.frozen_copy("teacher")
    target = student.frozen_copy("target")
    _frozen_in_bf16(cfg, student)
    disc = None
    if cfg.loss.lambda_adv > 0:
        disc = DiscriminatorHeads(student.feature_channels(), cfg.loss.disc_head_channels)
        disc = disc.to(device) if device is not None else disc
    iqa = None
    if cfg.loss.lambda_iqa > 0:
        iqa = ClipIQA.from_pretrained(cfg.loss.clip_arch, cfg.loss.clip_pretrained,
                                      quick_gelu=cfg.loss.clip_quick_gelu)
        iqa = iqa.to(device) if device is not None else iqa  # the whole module: towers and its mean / std
    return Models(student=student, distance=build_distance(cfg, device), teacher=teacher, target=target,
                  disc=disc, iqa=iqa)


def make_optimizer(params, lr: float, cfg: FlowSRConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
