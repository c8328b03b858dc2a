"""FlowSR losses (paper Eq. 5-9). Each returns a per-sample tensor of shape (B,); weighting and
reduction happen in the training step."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ImageDistance:
    """d(a, b) = mean squared error + lambda_p * LPIPS, on images in [-1, 1] (docs/DESIGN.md: the
    distance of Eq. 5-7 is taken in image space after VAE decode)."""

    def __init__(self, lpips: Optional[nn.Module] = None, lambda_lpips: float = 2.0):
        if lambda_lpips > 0 and lpips is None:
            raise ValueError("lambda_lpips > 0 needs an LPIPS model")
        self.lpips, self.lambda_lpips = lpips, lambda_lpips

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a.float() - b.float()).pow(2).flatten(1).mean(1)
        if self.lambda_lpips > 0:
            d = d + self.lambda_lpips * self.lpips(a.float(), b.float()).flatten(1).mean(1)
        return d


# ---- Eq. 7 -----------------------------------------------------------------------------------
def flow_loss(sr: torch.Tensor, hr: torch.Tensor, distance: ImageDistance) -> torch.Tensor:
    """||X_hat_HR - X_HR||^2 + lambda_p LPIPS, X_hat_HR = decode(f_theta(x_t, t))."""
    return distance(sr, hr)


# ---- Eq. 5 / Eq. 6 ---------------------------------------------------------------------------
def consistency_loss(student_from_t_prime: torch.Tensor, target_from_t: torch.Tensor,
                     distance: ImageDistance) -> torch.Tensor:
    """Eq. 5: d(f_theta(X_t', t'), f_theta-(X_hat_t, t))."""
    return distance(student_from_t_prime, target_from_t.detach())


def hr_regularised_consistency_loss(student_from_t_prime: torch.Tensor, target_from_t: torch.Tensor,
                                    student_from_t: torch.Tensor, hr: torch.Tensor,
                                    distance: ImageDistance) -> torch.Tensor:
    """Eq. 6: d(f_theta(X_t', t'), f_theta-(X_hat_t, t)) + d(f_theta(X_hat_t, t), X_0)."""
    return consistency_loss(student_from_t_prime, target_from_t, distance) + distance(student_from_t, hr)


# ---- Eq. 8 -----------------------------------------------------------------------------------
def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """max(0, 1 - D(x_HR)) + max(0, 1 + D(x_hat_HR))."""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -D(x_hat_HR)."""
    return -fake_logits


# ---- Eq. 9 -----------------------------------------------------------------------------------
def quality_alignment_loss(image_features: torch.Tensor, positive_text: torch.Tensor,
                           negative_text: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-log softmax over (sim(X_hat, c_pos), sim(X_hat, c_neg)), sim = cosine (features are
    L2-normalised), scaled by `temperature` (1.0 is Eq. 9 literally)."""
    pos = (image_features * positive_text).sum(-1)
    neg = (image_features * negative_text).sum(-1)
    logits = torch.stack([pos, neg], dim=-1) * temperature
    return -torch.log_softmax(logits, dim=-1)[:, 0]
