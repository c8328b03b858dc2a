"""Velocity-model backbones behind one contract: `velocity(x_t, t, cond) -> v`.

Every backbone also provides `encode` / `decode` between images in [-1, 1] and the space the
flow runs in (SD-VAE latents, or pixels), `trainable_parameters()`, `frozen_copy(name)` for the
teacher and the EMA target, `discriminator_features(x, timesteps)`, and `save_trainable` /
`load_trainable` for checkpoints.
"""
from __future__ import annotations

from typing import Optional

from ..config import ModelConfig
from .pixel import PixelBackbone
from .sd import SDLatentBackbone


def build_backbone(cfg: ModelConfig, *, device=None, with_lora: bool = True, option: Optional[str] = None):
    """The backbone named by `cfg.backbone`, loaded through its real loading code; `option` names
    how the calling command sets `cfg.pretrained` (in a missing-weights error)."""
    if cfg.backbone == "sd":
        kw = {"option": option} if option else {}
        return SDLatentBackbone.from_pretrained(cfg, device=device, with_lora=with_lora, **kw)
    if cfg.backbone == "pixel":
        return PixelBackbone.from_config(cfg, device=device)
    raise ValueError(f"unknown backbone: {cfg.backbone!r}")


__all__ = ["PixelBackbone", "SDLatentBackbone", "build_backbone"]
