"""Pieces shared by the backbones: the encoder half of a diffusers UNet, EMA, views."""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def unet_encoder_features(unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                          encoder_hidden_states=None) -> List[torch.Tensor]:
    """Feature maps after each down block and the mid block of a diffusers UNet
    (UNet2DConditionModel or UNet2DModel) — the discriminator's frozen feature extractor."""
    t_emb = unet.time_proj(timesteps.expand(x.shape[0])).to(dtype=x.dtype)
    emb = unet.time_embedding(t_emb)
    h = unet.conv_in(x)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        feats.append(h)
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    else:
        h = unet.mid_block(h, emb)
    feats.append(h)
    return feats


@torch.no_grad()
def ema_update(target_params, student_params, decay: float) -> None:
    """theta^- <- decay * theta^- + (1 - decay) * theta, parameter lists in the same order."""
    target_params, student_params = list(target_params), list(student_params)
    if len(target_params) != len(student_params):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target_params)} vs {len(student_params)}")
    torch._foreach_lerp_(target_params, [p.detach().to(t.dtype) for p, t in zip(student_params, target_params)],
                         1.0 - decay)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (once, here)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
