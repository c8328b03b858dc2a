"""Time grids and (t, t') pair samplers for consistency training (paper Sec. 4.2, Table 4).

Grids follow docs/DESIGN.md: slow grid t_k = k / n_slow (k = 1..n_slow), fast grid t_k = k / n_fast
(k = 1..n_fast). All samplers draw on the CPU from an explicit `torch.Generator`; move the result
to the device afterwards. Integer arithmetic keeps every value exactly on its grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def slow_grid(n_slow: int = 1000) -> torch.Tensor:
    """t_k = k / n_slow, k = 1..n_slow (float64)."""
    return torch.arange(1, n_slow + 1, dtype=torch.float64) / n_slow


def fast_grid(n_fast: int = 4) -> torch.Tensor:
    """t_k = k / n_fast, k = 1..n_fast (float64)."""
    return torch.arange(1, n_fast + 1, dtype=torch.float64) / n_fast


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Per-element uniform integer in [low, high] (inclusive)."""
    u = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    return low + torch.floor(u * (high - low + 1)).long()


def sample_slow(batch_size: int, n_slow: int = 1000, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """t uniform on the slow grid, shape (B,), float32 — the time of the flow loss (Eq. 2, 7)."""
    k = torch.randint(1, n_slow + 1, (batch_size,), generator=generator)
    return (k.double() / n_slow).float()


def sample_flow_time(batch_size: int, n_slow: int = 1000, t1_share: float = 0.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """t of the flow loss: each sample is t = 1 (the one-step start) with probability `t1_share`,
    else uniform on the slow grid. `t1_share = 0` is `sample_slow` exactly (same draws)."""
    t = sample_slow(batch_size, n_slow, generator)
    if t1_share <= 0:
        return t
    at_one = torch.rand(batch_size, generator=generator, dtype=torch.float64) < t1_share
    return torch.where(at_one, torch.ones_like(t), t)


@dataclass(frozen=True)
class TimePairs:
    """t < t_prime per sample; `fast_first` marks the branch that drew t_prime."""

    t: torch.Tensor
    t_prime: torch.Tensor
    fast_first: torch.Tensor


class FastSlowSampler:
    """Fast-slow time scheduling (paper Sec. 4.2).

    With p = 0.5 the fast scheduler draws t' on the fast grid and t is uniform on the slow-grid
    points in [t' - 1/n_fast, t'); otherwise the slow scheduler draws t' on the slow grid and t is
    the largest fast-grid point below t' (0 when there is none). With n_fast = 1 the slow-first
    branch would always give t = 0, so the sampler reduces to the paper's "t + dt = 1, t from the
    slow scheduler" case: every pair is fast-first.
    """

    def __init__(self, n_fast: int = 4, n_slow: int = 1000, p_fast: float = 0.5):
        if not 1 <= n_fast < n_slow:  # n_fast == n_slow: the first fast step would give t == t'
            raise ValueError(f"need 1 <= n_fast < n_slow, got n_fast={n_fast}, n_slow={n_slow}")
        if not 0.0 <= p_fast <= 1.0:
            raise ValueError(f"p_fast must be in [0, 1], got {p_fast}")
        self.n_fast, self.n_slow = n_fast, n_slow
        self.p_fast = 1.0 if n_fast == 1 else p_fast

    def draw(self, batch_size: int, generator: Optional[torch.Generator] = None) -> TimePairs:
        nf, ns = self.n_fast, self.n_slow
        fast_first = torch.rand(batch_size, generator=generator, dtype=torch.float64) < self.p_fast
        # fast first: t' = j / nf, t = k / ns with (j-1)/nf <= k/ns < j/nf and k >= 1
        j = torch.randint(1, nf + 1, (batch_size,), generator=generator)
        k_lo = torch.clamp(-((-(j - 1) * ns) // nf), min=1)
        k_hi = -((-j * ns) // nf) - 1
        k_fast = _uniform_int(k_lo, k_hi, generator)
        # slow first: t' = k / ns, t = j / nf with j the largest integer such that j/nf < k/ns
        k_slow = torch.randint(1, ns + 1, (batch_size,), generator=generator)
        j_slow = (k_slow * nf - 1) // ns
        t_prime = torch.where(fast_first, j.double() / nf, k_slow.double() / ns)
        t = torch.where(fast_first, k_fast.double() / ns, j_slow.double() / nf)
        return TimePairs(t.float(), t_prime.float(), fast_first)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None):
        """(t, t_prime), each shape (B,) float32, t < t_prime."""
        pairs = self.draw(batch_size, generator)
        return pairs.t, pairs.t_prime


class NIntervalSampler:
    """Consistency-distillation baseline of Song et al.: [0, 1] cut into N equal intervals, one
    interval n drawn uniformly, t = n / N, t' = (n + 1) / N. N = n_slow is "slow only"."""

    def __init__(self, n_intervals: int):
        if n_intervals < 1:
            raise ValueError(f"n_intervals must be >= 1, got {n_intervals}")
        self.n = n_intervals

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None):
        n = torch.randint(0, self.n, (batch_size,), generator=generator)
        return (n.double() / self.n).float(), ((n + 1).double() / self.n).float()


def make_pair_sampler(name: str, *, n_fast: int = 4, n_slow: int = 1000, n_intervals: int = 18):
    """Build a pair sampler by name: fast_slow | n_interval | slow_only."""
    if name == "fast_slow":
        return FastSlowSampler(n_fast, n_slow)
    if name == "n_interval":
        return NIntervalSampler(n_intervals)
    if name == "slow_only":
        return NIntervalSampler(n_slow)
    raise ValueError(f"unknown pair sampler: {name!r}")
