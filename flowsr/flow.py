"""SR-flow math of FlowSR (paper Eq. 1-4), pure torch.

Time convention, fixed once for the whole project: **t = 0 is HR, t = 1 is LR** (the LR image
resized to the HR size). Every function takes `t` as a Python float or a per-sample tensor of
shape (B,), and works on images or latents of shape (B, C, H, W) alike.

A velocity model is anything with the contract `velocity(x_t, t, cond) -> v`.

Precision: the arithmetic here runs in fp32 (fp64 inputs stay fp64) whatever the dtype of the
network that produced `x` or `v`. In bf16 (8 significant bits) neighbouring slow-grid times
merge — 0.999 rounds to 1.0, so a teacher step from t' = 1 to t = 0.999 would move nothing.
Results are fp32; a bf16 network casts its input itself.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

Time = Union[float, torch.Tensor]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Optional[object]], torch.Tensor]


def _precise(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or as it is when it is fp32 / fp64 already."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _as_time(t: Time, x: torch.Tensor) -> torch.Tensor:
    """`t` as a (B, 1, 1, ...) tensor in `x`'s (fp32 or fp64) dtype that broadcasts against `x`."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


# ---- Eq. 1: the straight path between HR (t=0) and LR (t=1) ------------------------------
def interpolate(x_hr: torch.Tensor, x_lr: torch.Tensor, t: Time) -> torch.Tensor:
    """X_t = (1 - t) X_HR + t X_LR, in fp32."""
    x_hr, x_lr = _precise(x_hr), _precise(x_lr)
    t = _as_time(t, x_hr)
    return (1 - t) * x_hr + t * x_lr


# ---- Eq. 2: the regression target ----------------------------------------------------------
def target_velocity(x_hr: torch.Tensor, x_lr: torch.Tensor) -> torch.Tensor:
    """dX_t/dt = X_LR - X_HR."""
    return x_lr - x_hr


# ---- Euler solver (Sec. 4.1) and teacher step (Eq. 3) -------------------------------------
def euler_step(x: torch.Tensor, v: torch.Tensor, t_from: Time, t_to: Time) -> torch.Tensor:
    """X_{t_to} = X_{t_from} + (t_to - t_from) v, in fp32; with t_to < t_from this moves towards HR."""
    x, v = _precise(x), _precise(v)
    return x + (_as_time(t_to, x) - _as_time(t_from, x)) * v


# ---- Eq. 4: the consistency function ------------------------------------------------------
def consistency(x_t: torch.Tensor, t: Time, v: torch.Tensor) -> torch.Tensor:
    """f(X_t, t) = X_t - t v, in fp32: the HR estimate reached in one Euler step; f(x, 0) = x."""
    x_t, v = _precise(x_t), _precise(v)
    return x_t - _as_time(t, x_t) * v


def time_grid(steps: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform inference grid 1 = t_0 > t_1 > ... > t_steps = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(velocity: VelocityFn, x_lr: torch.Tensor, steps: int = 1, cond=None) -> torch.Tensor:
    """Euler integration of dX = v dt from t=1 (LR) to t=0 (HR) in `steps` uniform steps."""
    grid = time_grid(steps, device=x_lr.device)
    x = x_lr
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        t = t_from.expand(x.shape[0])  # fp32 whatever x's dtype
        x = euler_step(x, velocity(x, t, cond), t_from, t_to)
    return x
