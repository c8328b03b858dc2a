"""The random draws of one optimiser step, independent of how the global batch is divided.

A training step's randomness (flow times, (t, t') pairs, noise, discriminator times) is drawn for
the whole global batch from streams keyed by (seed, stage, step, name) and then cut to the rows a
worker, and an accumulation chunk of it, trains on. A sample's draws therefore depend only on its
row of the global batch: one worker and eight give the same losses and the same gradients.

Large draws (noise the size of a latent) are made on the device: no host-to-device copy. Small
ones come from the schedule samplers on the CPU and are sent with a non-blocking copy from pinned
memory, so the host never waits for the device inside a step.

Which rows get L_flow in stage 2 is fixed by position in the stream of rows: row g = step * N + p
(N the global batch, p the row in it) is a flow row when floor((g + 1) f) > floor(g f), f the flow
fraction. That spreads the flow rows evenly over the batch (every worker with two or more rows
sees both terms at f = 1/2) and over steps (a global batch of one alternates).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .seeds import seeded_generator


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: pinned and non-blocking on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class StepDraws:
    """Draws of step `step` for the rows `rows` (a range of positions in the global batch of
    `global_batch` rows) on `device`."""

    def __init__(self, seed: int, stage: int, step: int, global_batch: int, device, rows: Optional[range] = None):
        self.seed, self.stage, self.step, self.global_batch = seed, stage, step, global_batch
        self.device = torch.device(device)
        self.rows = range(global_batch) if rows is None else rows
        if not (0 <= self.rows.start <= self.rows.stop <= global_batch):
            raise ValueError(f"rows {self.rows} are not inside a global batch of {global_batch}")

    @classmethod
    def from_generator(cls, generator: Optional[torch.Generator], batch: int, device, stage: int = 0) -> "StepDraws":
        """Draws for a single-process caller that holds a torch.Generator (benchmarks, tests):
        a seed taken from `generator` (or fresh) for one batch of `batch` rows."""
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        return cls(seed, stage, 0, batch, device)

    def __len__(self) -> int:
        return len(self.rows)

    def chunk(self, start: int, stop: int) -> "StepDraws":
        """The draws of rows start..stop of this one (an accumulation chunk)."""
        rows = range(self.rows.start + start, self.rows.start + stop)
        return StepDraws(self.seed, self.stage, self.step, self.global_batch, self.device, rows)

    def subset(self, positions: Sequence[int]) -> "RowSubset":
        """The draws of some of this one's rows (local positions)."""
        return RowSubset(self, list(positions))

    # ---- streams ---------------------------------------------------------------------------
    def _generator(self, name: str, device: torch.device) -> Optional[torch.Generator]:
        if device.type == "meta":
            return None  # meta tensors hold no values
        return seeded_generator(self.seed, self.stage, self.step, name, device=device)

    def _cut(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rows.start:self.rows.stop]

    def normal(self, name: str, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """N(0, I) of shape (rows, *shape), drawn on the device."""
        full = torch.randn((self.global_batch, *shape), generator=self._generator(name, self.device),
                           device=self.device, dtype=dtype)
        return self._cut(full)

    def host(self, name: str, draw: Callable[[int, torch.Generator], Union[torch.Tensor, Tuple]]):
        """`draw(global_batch, cpu_generator)` (a schedule sampler) cut to the rows, on the device."""
        out = draw(self.global_batch, self._generator(name, torch.device("cpu")))
        if isinstance(out, torch.Tensor):
            return to_device(self._cut(out), self.device)
        return tuple(to_device(self._cut(o), self.device) for o in out)

    def integers(self, name: str, low: int, high: int) -> torch.Tensor:
        """Uniform integers in [low, high] (inclusive), shape (rows,), int64."""
        return self.host(name, lambda n, g: torch.randint(low, high + 1, (n,), generator=g))

    # ---- roles of the rows in stage 2 ------------------------------------------------------
    def flow_rows(self, fraction: float) -> Tuple[List[int], List[int]]:
        """(local positions of the flow rows, of the consistency rows) of these rows."""
        flow, cons = [], []
        for i, p in enumerate(self.rows):
            (flow if is_flow_row(self.step * self.global_batch + p, fraction) else cons).append(i)
        return flow, cons


class RowSubset:
    """Some rows of a `StepDraws`: each stream is cut to the rows first, then to the subset."""

    def __init__(self, draws: StepDraws, positions: List[int]):
        self.draws, self.positions = draws, positions
        self._index = to_device(torch.tensor(positions, dtype=torch.long), draws.device)

    def __len__(self) -> int:
        return len(self.positions)

    def normal(self, name: str, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return self.draws.normal(name, shape, dtype).index_select(0, self._index)

    def host(self, name: str, draw):
        out = self.draws.host(name, draw)
        if isinstance(out, torch.Tensor):
            return out.index_select(0, self._index)
        return tuple(o.index_select(0, self._index) for o in out)

    def integers(self, name: str, low: int, high: int) -> torch.Tensor:
        return self.draws.integers(name, low, high).index_select(0, self._index)


def is_flow_row(g: int, fraction: float) -> bool:
    """Whether row `g` of the stream of training rows gets L_flow (see the module docstring)."""
    return math.floor((g + 1) * fraction + 1e-9) > math.floor(g * fraction + 1e-9)
