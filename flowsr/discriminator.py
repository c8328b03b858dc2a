"""Latent discriminator (paper Eq. 8): small trainable heads on the features of a frozen diffusion
UNet's encoder, applied to the latent noised at a random diffusion time (as in LADD / PCM / DMD2)."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn


class DiscriminatorHeads(nn.Module):
    """One conv head per feature map; the logit is the mean of the heads' spatial means."""

    def __init__(self, feature_channels: Sequence[int], hidden: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.GroupNorm(min(8, hidden), hidden), nn.SiLU(),
                          nn.Conv2d(hidden, 1, 1))
            for c in feature_channels)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """features -> logits (B,)."""
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        logits = [head(f.to(head[0].weight.dtype)).flatten(1).mean(1) for head, f in zip(self.heads, features)]
        return torch.stack(logits, 0).mean(0)


def noise_latent(z: torch.Tensor, noise_scheduler, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z noised to the diffusion `timesteps` (B,) with `noise` (the DDPM forward process)."""
    return noise_scheduler.add_noise(z, noise.to(z.dtype), timesteps)


def discriminator_logits(backbone, heads: nn.Module, z_noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """D(z_noisy, t): frozen backbone features, trainable heads."""
    return heads(backbone.discriminator_features(z_noisy, timesteps))
