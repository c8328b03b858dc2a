"""Antialiased bicubic resizing of an image that arrives as bands of rows (Real-ESRGAN's --outscale).

`resize_taps` gives the source pixels and weights of each output pixel exactly as
`F.interpolate(mode="bicubic", antialias=True, align_corners=False)` places them;
`RowResizer` applies them to rows as they arrive, holding only the rows that later output rows
still read. Pure torch, device-agnostic.
"""
from __future__ import annotations

from typing import Tuple

import torch


def resize_taps(in_size: int, out_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, weights, last), indices and weights (out_size, K): the source pixels and weights of
    each output pixel of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)` from
    `in_size` to `out_size` pixels (Keys' cubic with a = -0.5, as PIL; widened by the scale when
    shrinking; taps outside the image dropped and the rest renormalised), and `last` (out_size,):
    the last source pixel each output pixel reads."""
    scale = in_size / out_size
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = (center - support + 0.5).trunc().clamp(min=0).long()
    last = (center + support + 0.5).trunc().clamp(max=in_size).long() - 1
    index = first[:, None] + torch.arange(int((last - first).max()) + 1)[None]
    inside = index <= last[:, None]
    d = ((index - center[:, None] + 0.5) * stretch).abs()
    a = -0.5
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    weights = torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d))) * inside
    weights = weights / weights.sum(1, keepdim=True)
    index = torch.where(inside, index, first[:, None])
    return index.to(device), weights.float().to(device), last.to(device)


class RowResizer:
    """Resizes an image of `size` = (h, w) that arrives as bands of rows, top to bottom, to `out_size`
    (antialiased bicubic, `resize_taps`), clamped to [0, 1], and hands output rows to
    `emit(top, rows)` as soon as the rows they read have arrived. Columns are resized as rows
    arrive; only the rows that later output rows still read are held (about one band plus the
    filter's reach): memory O(band x width). The bound: equal to the whole-image `F.interpolate`
    of the float64 image within 1e-6 at any size (taps placed in float64; float32 `F.interpolate`
    places them in float32 and is itself off by ~1e-5 at a few hundred pixels, ~5e-4 at 10^4)."""

    def __init__(self, size: Tuple[int, int], out_size: Tuple[int, int], emit, device=None):
        self.size, self.out_size, self.emit = tuple(size), tuple(out_size), emit
        self.row_index, self.row_weight, _ = resize_taps(size[0], out_size[0], device)
        self.col_index, self.col_weight, _ = resize_taps(size[1], out_size[1], device)
        # host copies of the row bookkeeping: which rows are final never waits for the device
        host_index, _, self.host_last = resize_taps(size[0], out_size[0])
        self.host_first = host_index[:, 0]
        self.held, self.held_top, self.received, self.done = None, 0, 0, 0

    def add(self, top: int, rows: torch.Tensor) -> None:
        """The next rows (C, n, w) of the source image, starting at row `top`."""
        if top != self.received:
            raise ValueError(f"rows must arrive in order: expected row {self.received}, got {top}")
        cols = sum(rows[:, :, self.col_index[:, k]] * self.col_weight[:, k] for k in range(self.col_index.shape[1]))
        self.held = cols if self.held is None else torch.cat([self.held, cols], 1)
        self.received = top + rows.shape[1]
        end = int(torch.searchsorted(self.host_last, self.received))  # output rows whose sources all arrived
        if end <= self.done:
            return
        index = self.row_index[self.done:end] - self.held_top
        weight = self.row_weight[self.done:end]
        out = sum(self.held[:, index[:, k], :] * weight[:, k, None] for k in range(index.shape[1]))
        self.emit(self.done, out.clamp(0, 1))
        self.done = end
        if end < self.out_size[0]:
            keep = int(self.host_first[end:].min())
            self.held, self.held_top = self.held[:, keep - self.held_top:].clone(), keep
        else:
            self.held = None
