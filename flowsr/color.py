"""Colour correction of an SR image against its LR resized to the output size (StableSR / OSEDiff).

`wavelet` keeps the SR's high frequencies over the LR's low frequencies (an a-trous wavelet
decomposition); `adain` gives the SR the LR's per-channel mean and std; `none` leaves it.
`color_correct` works on whole images; `BandColorFix` does the same on an image that arrives as
bands of final rows, holding about one band (the wavelet fix) or one float16 image (adain).

Images are (B, 3, H, W) float tensors in [-1, 1].
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

COLOR_FIXES = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5  # a-trous levels of the wavelet colour fix (dilations 1..16), as StableSR
WAVELET_MARGIN = 2 ** WAVELET_LEVELS - 1  # rows of context the wavelet low-pass reads on each side


def check_color_fix(method: str) -> None:
    """Raise ValueError unless `method` is one of COLOR_FIXES."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown color_fix: {method!r} (choose from {', '.join(COLOR_FIXES)})")


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN: per image and channel, give `content` the mean and std of `style`."""
    c_mean, c_std = content.mean((-2, -1), keepdim=True), (content.var((-2, -1), keepdim=True) + eps).sqrt()
    s_mean, s_std = style.mean((-2, -1), keepdim=True), (style.var((-2, -1), keepdim=True) + eps).sqrt()
    return (content - c_mean) / c_std * s_std + s_mean


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur dilated by `radius`, replicate-padded (one a-trous wavelet level)."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), k, dilation=radius, groups=x.shape[1])


def wavelet_decomposition(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequencies) with x = high + low."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """High frequencies of `content` over the low frequencies (colour) of `style`."""
    return wavelet_decomposition(content)[0] + wavelet_decomposition(style)[1]


def color_correct(sr: torch.Tensor, lr_up: torch.Tensor, method: str) -> torch.Tensor:
    """`sr` colour-corrected against `lr_up` by `method` (one of COLOR_FIXES; `none` returns `sr`)."""
    check_color_fix(method)
    if method == "wavelet":
        return wavelet_color_fix(sr, lr_up).clamp(-1, 1)
    if method == "adain":
        return adain_color_fix(sr, lr_up).clamp(-1, 1)
    return sr


# ---- streaming colour correction: one band of rows at a time ------------------------------------
def wavelet_low(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low frequencies of `wavelet_decomposition` (a linear low-pass)."""
    for i in range(levels):
        x = wavelet_blur(x, 2 ** i)
    return x


class BandColorFix:
    """Colour-corrects an SR image of size (H, W) that arrives as bands of final rows, top to bottom,
    and passes corrected rows on to `emit(top, rows)` (rows (3, n, W) float32 in [-1, 1]).

    wavelet: high(sr) + low(lr_up) = sr + low(lr_up - sr), computed on a band with WAVELET_MARGIN
    rows of context, so only about one band of rows is held. adain: needs the whole image's
    statistics, so the rows wait in one (3, H, W) float16 buffer. none: rows go straight through.
    `lr_up` is the LR at the output size, read by `lr_up.crop(top, bottom, left, right)` ->
    (3, bottom - top, right - left) float32 (`flowsr.tiling.BicubicSource`)."""

    def __init__(self, method: str, lr_up, size: Tuple[int, int], emit):
        check_color_fix(method)
        self.method, self.lr_up, self.size, self.emit = method, lr_up, size, emit
        self.pending, self.pending_top, self.done = None, 0, 0  # wavelet: rows [pending_top, ...) held
        self.stats = torch.zeros(2, 3, dtype=torch.float64)  # adain: sums of x and x^2 per channel
        self.held = None

    def add(self, rows: torch.Tensor) -> None:
        """The next final SR rows (3, n, W)."""
        if self.method == "none":
            self.emit(self.done, rows)
            self.done += rows.shape[1]
        elif self.method == "adain":
            if self.held is None:
                self.held = torch.empty(3, *self.size, dtype=torch.float16, device=rows.device)
            self.held[:, self.done:self.done + rows.shape[1]] = rows.half()
            self.stats += torch.stack([rows.double().sum((1, 2)), rows.double().square().sum((1, 2))]).cpu()
            self.done += rows.shape[1]
        else:
            self.pending = rows if self.pending is None else torch.cat([self.pending, rows], 1)
            self._wavelet_flush(final=self.pending_top + self.pending.shape[1] >= self.size[0])

    def _wavelet_flush(self, final: bool) -> None:
        available = self.pending_top + self.pending.shape[1]
        end = self.size[0] if final else available - WAVELET_MARGIN
        if end <= self.done:
            return
        top, bottom = self.pending_top, available
        sr = self.pending
        lr = self.lr_up.crop(top, bottom, 0, self.size[1])
        fixed = (sr + wavelet_low(lr[None] - sr[None])[0]).clamp(-1, 1)
        self.emit(self.done, fixed[:, self.done - top:end - top])
        self.done = end
        keep = max(top, end - WAVELET_MARGIN)
        self.pending, self.pending_top = self.pending[:, keep - top:].clone(), keep

    def finish(self) -> None:
        if self.method != "adain":
            return
        H, W = self.size
        n = H * W
        style = torch.zeros(2, 3, dtype=torch.float64)
        band = max(1, (1 << 22) // max(W, 1))
        for top in range(0, H, band):
            lr = self.lr_up.crop(top, min(H, top + band), 0, W).double()
            style += torch.stack([lr.sum((1, 2)), lr.square().sum((1, 2))]).cpu()
        eps = 1e-5

        def mean_std(s):
            mean = s[0] / n
            var = (s[1] - n * mean ** 2) / max(n - 1, 1)  # unbiased, as torch.var
            return mean, (var.clamp(min=0) + eps).sqrt()
        (c_mean, c_std), (s_mean, s_std) = mean_std(self.stats), mean_std(style)
        gain = (s_std / c_std).float().to(self.held.device)[:, None, None]
        shift = (s_mean - c_mean * s_std / c_std).float().to(self.held.device)[:, None, None]
        for top in range(0, H, band):
            rows = self.held[:, top:top + band].float()
            self.emit(top, (rows * gain + shift).clamp(-1, 1))
        self.held = None


