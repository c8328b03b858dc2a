"""Inference: LR image -> SR image with 1 or N Euler steps of the SR flow."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flow


def resize_to(lr: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize of (B, 3, h, w) in [-1, 1] to `size` = (H, W) (the paper's LR upscaling)."""
    return F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def super_resolve(backbone, lr_up: torch.Tensor, steps: int = 1, cond=None, generator=None) -> torch.Tensor:
    """(B, 3, H, W) LR already at the HR size, in [-1, 1] -> SR in [-1, 1].
    Runs encode -> `steps` Euler steps from t=1 to t=0 -> decode."""
    z = backbone.encode(lr_up)
    if backbone.cfg.flow_source == "sr_flow":
        x1 = z
    else:  # Table-2 ablations start from noise (or noised LR) with the LR as condition
        eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        x1 = eps if backbone.cfg.flow_source == "noise" else z + backbone.cfg.noised_lr_sigma * eps
        cond = z
    return backbone.decode(flow.sample(backbone.velocity, x1, steps, cond)).clamp(-1, 1)
