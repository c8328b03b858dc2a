"""Inference: LR image -> SR image with 1 or N Euler steps of the SR flow.

`super_resolve` runs the flow on a batch already resized to the HR size. `upscale` adds what a
real image needs: any input size and scale factor (the LR is resized bicubically to the target
size, as the paper does), overlapping tiles run end to end and blended with Gaussian weights
(MultiDiffusion / StableSR), and colour correction against the upscaled LR (wavelet or AdaIN, as
StableSR / OSEDiff). `upscale_stream` never holds an image-sized float buffer: the LR is resized
per tile, and rows are blended, colour-corrected and handed on in bands as they become final;
`stream_tiles` is that machinery around any tile function (the backbone here, an onnxruntime
session in `pipeline.onnx_models`). `Upscaler` is the stateful batch callable of Ray's
batch-inference template (`TileUpscaler`'s contract); it also runs in a plain loop without Ray.

Images are (B, 3, H, W) float tensors in [-1, 1] unless stated otherwise. Tile sizes are in
output (HR) pixels.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import flow

COLOR_FIXES = ("wavelet", "adain", "none")
GAUSSIAN_TILE_SIGMA = 0.1  # std of the blending weights, as a fraction of the tile size (StableSR var=0.01)
WAVELET_LEVELS = 5  # a-trous levels of the wavelet colour fix (dilations 1..16), as StableSR
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's RGB -> L


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


# ---- sizes --------------------------------------------------------------------------------------
def output_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    """(H, W) = (h, w) * scale, rounded half up, at least 1 pixel: the one rule for output sizes."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, math.floor(h * scale + 0.5)), max(1, math.floor(w * scale + 0.5))


def size_multiple(backbone) -> int:
    """Pixel multiple the backbone needs: VAE factor x the velocity UNet's down-sampling factor."""
    net = getattr(backbone, "unet", None) or getattr(backbone, "net", None)
    blocks = getattr(getattr(net, "config", None), "block_out_channels", None)
    return backbone.latent_factor * (2 ** (len(blocks) - 1) if blocks else 1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Replicate-pad (B, C, h, w) at the bottom and right to `size` = (H, W) >= (h, w)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, dw, 0, dh), mode="replicate") if dh or dw else x


# ---- Gaussian-blended tiles (MultiDiffusion / StableSR) -----------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Starts of the fewest tiles of size min(tile, length), evenly spaced, that cover
    [0, length) with neighbours sharing at least `overlap`."""
    if tile >= length:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_shape(h: int, w: int, tile: int, multiple: int = 1) -> Tuple[int, int]:
    """(th, tw): the sides of the tiles of an h x w image for tiles of `tile` x `tile` pixels.

    The tile is a budget of tile^2 pixels (what bounds the network's memory), not a square: a
    side shorter than `tile` leaves the rest of the budget to the other side (rounded down to
    `multiple`, at least `tile`). A thin image then runs in as few tiles as a square one of the
    same area — whole, when it fits the budget, so its result is the whole-image forward — where
    square tiles of a 64-pixel strip cut it into ~tile/64 times as many tiles, each an extra
    seam between the tiles' forwards of a network that is not local (normalisation, attention).
    Each side is at most the image's."""
    th, tw = min(tile, h), min(tile, w)
    if th < tile:
        tw = min(w, max(tw, tile * tile // th // multiple * multiple))
    elif tw < tile:
        th = min(h, max(th, tile * tile // tw // multiple * multiple))
    return th, tw


def gaussian_weights(h: int, w: int, *, device=None) -> torch.Tensor:
    """(1, 1, h, w) separable Gaussian peaked at the tile centre, std GAUSSIAN_TILE_SIGMA x size."""
    def axis(n):
        x = torch.arange(n, device=device, dtype=torch.float64)
        return torch.exp(-0.5 * ((x - (n - 1) / 2) / (GAUSSIAN_TILE_SIGMA * n)) ** 2)
    return (axis(h)[:, None] * axis(w)[None, :]).float()[None, None]


Box = Tuple[int, int, int]  # (image index, top, left) in grid cells


def crop_boxes(x: torch.Tensor, boxes: Sequence[Box], size: Tuple[int, int], unit: int = 1) -> torch.Tensor:
    """Stack the crops of `x` (B, C, H, W) at `boxes`, each `size` grid cells of `unit` pixels."""
    th, tw = size[0] * unit, size[1] * unit
    return torch.stack([x[b, :, y * unit:y * unit + th, c * unit:c * unit + tw] for b, y, c in boxes])


def tiled_apply(fn: Callable[[torch.Tensor, Sequence[Box]], torch.Tensor], x: torch.Tensor,
                tile: Optional[int], overlap: int, *, unit_in: int = 1, unit_out: int = 1,
                tile_batch: int = 16) -> torch.Tensor:
    """Run `fn(tiles, boxes)` on overlapping tiles of `x` and blend the outputs with Gaussian weights.

    `x` is (B, C, H, W) on a grid of (H / unit_in, W / unit_in) cells; one cell of input is
    `unit_in` pixels and one cell of output `unit_out` pixels (VAE encode: 8 -> 1, decode: 1 -> 8,
    velocity: 1 -> 1). `tile` and `overlap` are in cells; `tile=None` runs whole images.
    Tiles (`tile_shape`: tile x tile cells, longer on a thin image) of all images are batched
    together, `tile_batch` at a time. Returns float32.
    """
    B, _, H, W = x.shape
    gh, gw = H // unit_in, W // unit_in
    if not tile:
        tile = max(gh, gw)
    size = tile_shape(gh, gw, tile)
    # tile sizes are rounded to whole cells: keep a positive stride on each axis
    grid = [(y, c) for y in tile_starts(gh, size[0], min(overlap, size[0] - 1))
            for c in tile_starts(gw, size[1], min(overlap, size[1] - 1))]
    boxes = [(b, y, c) for b in range(B) for y, c in grid]
    if len(grid) == 1:  # one tile per image: the blend is the identity
        return torch.cat([fn(x[i:i + tile_batch], boxes[i:i + tile_batch]).float() for i in range(0, B, tile_batch)])
    weight = gaussian_weights(size[0] * unit_out, size[1] * unit_out, device=x.device)
    th, tw = size[0] * unit_out, size[1] * unit_out
    wsum = torch.zeros(1, 1, gh * unit_out, gw * unit_out, device=x.device)
    for y, c in grid:
        wsum[..., y * unit_out:y * unit_out + th, c * unit_out:c * unit_out + tw] += weight
    out = None
    for i in range(0, len(boxes), tile_batch):
        chunk = boxes[i:i + tile_batch]
        y_tiles = fn(crop_boxes(x, chunk, size, unit_in), chunk).float()
        if out is None:
            out = torch.zeros(B, y_tiles.shape[1], gh * unit_out, gw * unit_out, device=x.device)
        for (b, y, c), t in zip(chunk, y_tiles):
            out[b, :, y * unit_out:y * unit_out + th, c * unit_out:c * unit_out + tw] += t * weight[0]
    return out / wsum


# ---- colour correction (StableSR / OSEDiff) -----------------------------------------------------
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
    if method == "wavelet":
        return wavelet_color_fix(sr, lr_up).clamp(-1, 1)
    if method == "adain":
        return adain_color_fix(sr, lr_up).clamp(-1, 1)
    if method == "none":
        return sr
    raise ValueError(f"unknown color_fix: {method!r} (choose from {', '.join(COLOR_FIXES)})")


# ---- upscale: any size, tiled -------------------------------------------------------------------
def _model_dtype(backbone) -> torch.dtype:
    p = next(iter(backbone.parameters()), None) if hasattr(backbone, "parameters") else None
    return p.dtype if p is not None else torch.float32


def _cells(pixels: Optional[int], unit: int, multiple: int = 1) -> Optional[int]:
    """A tile size in output pixels as grid cells of `unit` pixels, a multiple of `multiple`."""
    if not pixels:
        return None
    return max(multiple, pixels // unit // multiple * multiple)


def _check_tiles(tile, tile_overlap, vae_tile) -> None:
    for name, value in (("tile", tile), ("vae_tile", vae_tile)):
        if value and value <= tile_overlap:
            raise ValueError(f"{name}={value} must be larger than tile_overlap={tile_overlap}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")


@torch.no_grad()
def upscale_padded(backbone, lr_up: torch.Tensor, steps: int = 1, *, tile: Optional[int] = 512,
                   tile_overlap: int = 64, vae_tile: Optional[int] = 512, tile_batch: int = 16,
                   cond=None, generator=None) -> torch.Tensor:
    """SR flow on (B, 3, H, W) LR at the HR size, H and W multiples of `size_multiple(backbone)`:
    tiled VAE encode -> `steps` Euler steps with a tiled velocity -> tiled VAE decode.
    Returns float32 SR in [-1, 1], not colour-corrected."""
    f, m = backbone.latent_factor, size_multiple(backbone) // backbone.latent_factor
    dtype = _model_dtype(backbone)
    cells_v, over_v = _cells(tile, f, m), tile_overlap // f
    cells_vae = _cells(vae_tile, f)

    def prep(tiles):
        return tiles.to(dtype).contiguous(memory_format=torch.channels_last)

    def encode(tiles, boxes):
        return backbone.encode(prep(tiles))

    def decode(tiles, boxes):
        return backbone.decode(prep(tiles))

    z = tiled_apply(encode, lr_up, cells_vae, over_v, unit_in=f, tile_batch=tile_batch)
    if backbone.cfg.flow_source == "sr_flow":
        x1 = z
    else:  # Table-2 ablations: noise (or noised LR) as the start, the LR latent as condition
        eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        x1 = eps if backbone.cfg.flow_source == "noise" else z + backbone.cfg.noised_lr_sigma * eps
        cond = z

    def velocity(x, t, c):
        def run(tiles, boxes):
            size = (tiles.shape[-2], tiles.shape[-1])
            index = torch.tensor([b for b, _, _ in boxes], device=x.device)
            return backbone.velocity(prep(tiles), t[index], _tile_cond(c, boxes, size, index, dtype))
        return tiled_apply(run, x, cells_v, over_v, tile_batch=tile_batch)

    x0 = flow.sample(velocity, x1, steps, cond)
    return tiled_apply(decode, x0, cells_vae, over_v, unit_out=f, tile_batch=tile_batch).clamp(-1, 1)


def _tile_cond(cond, boxes, size, index, dtype):
    """The condition of each tile: a spatial tensor (B, C, h, w) is cropped like x, any other
    tensor (B, ...) is indexed by image, None stays None."""
    if cond is None:
        return None
    if cond.ndim == 4:
        return crop_boxes(cond, boxes, size).to(dtype)
    return cond[index].to(dtype)


# ---- bicubic resize on the fly (the LR at the output size, one band at a time) -----------------
BICUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


@functools.lru_cache(maxsize=64)  # a batch's images mostly share their sizes; the taps are read-only
def _bicubic_taps(in_size: int, out_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights), each (out_size, 4): the source pixels and weights of each output pixel
    of `F.interpolate(mode="bicubic", align_corners=False)` from `in_size` to `out_size` pixels
    (half-pixel centres, A = -0.75, border pixels repeated)."""
    scale = in_size / out_size
    real = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5
    first = real.floor()
    t = (real - first)[:, None]
    d = torch.cat([t + 1, t, 1 - t, 2 - t], 1).abs()
    a = BICUBIC_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    weights = torch.where(d <= 1, near, far)
    index = (first.long()[:, None] + torch.arange(-1, 3)[None]).clamp(0, in_size - 1)
    return index.to(device), weights.float().to(device)


class BicubicSource:
    """An LR image `src` (C, h, w) — integers in [0, `peak`] (scaled to [-1, 1]) or float in [-1, 1] —
    seen as its bicubic resize to `size` = (H, W), replicate-padded beyond (H, W), clamped to
    [-1, 1] (= `pad_to(resize_to(src, size), ...)`), read one crop at a time: a crop costs memory
    in its own size, never the resized image's. Gray (C = 1) is repeated to 3 channels."""

    def __init__(self, src: torch.Tensor, size: Tuple[int, int], peak: Optional[int] = None):
        self.src, self.size, self.peak = src, tuple(size), peak
        self.rows = _bicubic_taps(src.shape[-2], size[0], src.device)
        self.cols = _bicubic_taps(src.shape[-1], size[1], src.device)
        # host copies of the source indices: a crop's bounds never wait for the device
        self.rows_host = _bicubic_taps(src.shape[-2], size[0])[0]
        self.cols_host = _bicubic_taps(src.shape[-1], size[1])[0]

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / (self.peak / 2) - 1 if self.peak else x.float()

    def crop(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        """(3, bottom - top, right - left) float32: rows [top, bottom), columns [left, right)."""
        H, W = self.size
        device = self.src.device
        r = torch.arange(top, bottom, device=device).clamp(max=H - 1)
        c = torch.arange(left, right, device=device).clamp(max=W - 1)
        r_index, r_weight = self.rows[0][r], self.rows[1][r]
        c_index, c_weight = self.cols[0][c], self.cols[1][c]
        r_host = self.rows_host[min(top, H - 1):min(bottom, H)]
        c_host = self.cols_host[min(left, W - 1):min(right, W)]
        r0, r1 = int(r_host.min()), int(r_host.max()) + 1
        c0, c1 = int(c_host.min()), int(c_host.max()) + 1
        block = self._float(self.src[:, r0:r1, c0:c1])
        cols = sum(block[:, :, c_index[:, k] - c0] * c_weight[:, k] for k in range(4))  # (C, r1 - r0, n)
        out = sum(cols[:, r_index[:, k] - r0, :] * r_weight[:, k, None] for k in range(4))
        out = out.clamp(-1, 1)
        return out.expand(3, -1, -1) if out.shape[0] == 1 else out


# ---- streaming colour correction: one band of rows at a time ------------------------------------
WAVELET_MARGIN = 2 ** WAVELET_LEVELS - 1  # rows of context the wavelet low-pass reads on each side


def wavelet_low(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low frequencies of `wavelet_decomposition` (a linear low-pass)."""
    for i in range(levels):
        x = wavelet_blur(x, 2 ** i)
    return x


class _BandColorFix:
    """Colour-corrects an SR image of size (H, W) that arrives as bands of final rows, top to bottom,
    and passes corrected rows on to `emit(top, rows)` (rows (3, n, W) float32 in [-1, 1]).

    wavelet: high(sr) + low(lr_up) = sr + low(lr_up - sr), computed on a band with WAVELET_MARGIN
    rows of context, so only about one band of rows is held. adain: needs the whole image's
    statistics, so the rows wait in one (3, H, W) float16 buffer. none: rows go straight through."""

    def __init__(self, method: str, lr_up: BicubicSource, size: Tuple[int, int], emit):
        if method not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {method!r} (choose from {', '.join(COLOR_FIXES)})")
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


# ---- blended bands: tiles in, final rows out ----------------------------------------------------
class TileBlender:
    """The Gaussian blend of a grid of tiles (MultiDiffusion / StableSR), done a band of rows at a time.

    Tiles are `th` x `tw` pixels at rows `ys` (tile_starts) and columns `xs` of a canvas `width`
    pixels wide, weighted by a separable Gaussian (`gaussian_weights`) and normalised by the sum of
    the weights. `band(size, emit)` gives one image's accumulator: its tiles are added tile row by
    tile row (top to bottom, left to right), and as soon as a tile row is complete the rows no later
    tile touches are normalised and handed to `emit(top, rows)` (rows (C, n, W) float32, cropped to
    the image's `size` = (H, W)). A band holds at most `th` rows of the canvas: O(tile x width)."""

    def __init__(self, ys: Sequence[int], xs: Sequence[int], th: int, tw: int, width: int, device=None):
        self.ys, self.xs, self.th, self.tw, self.width = list(ys), list(xs), th, tw, width
        gy = gaussian_weights(th, 1, device=device)[0, 0, :, 0]
        gx = gaussian_weights(1, tw, device=device)[0, 0, 0]
        self.wsum_y = torch.zeros(self.ys[-1] + th, device=device)
        self.wsum_x = torch.zeros(width, device=device)
        for y in self.ys:
            self.wsum_y[y:y + th] += gy
        for x in self.xs:
            self.wsum_x[x:x + tw] += gx
        self.weight = gy[:, None] * gx[None, :]
        self.device = device

    def band(self, size: Tuple[int, int], emit: Callable[[int, torch.Tensor], None]) -> "BlendedBand":
        return BlendedBand(self, size, emit)


class BlendedBand:
    """One image's rows under blend (see `TileBlender`)."""

    def __init__(self, grid: TileBlender, size: Tuple[int, int], emit: Callable[[int, torch.Tensor], None]):
        self.grid, self.size, self.emit = grid, tuple(size), emit
        self.acc, self.top = None, 0  # rows [top, top + acc.shape[1]) of the canvas

    def add(self, r: int, x: int, tile: torch.Tensor) -> None:
        """Add the output `tile` (C, th, tw) of tile row `r` (rows from ys[r]) at column `x`."""
        g = self.grid
        if self.acc is None:
            self.acc = torch.zeros(tile.shape[0], 0, g.width, device=g.device)
        y = g.ys[r] - self.top
        if y + g.th > self.acc.shape[1]:
            grow = torch.zeros(self.acc.shape[0], y + g.th - self.acc.shape[1], g.width, device=g.device)
            self.acc = torch.cat([self.acc, grow], 1)
        self.acc[:, y:y + g.th, x:x + g.tw] += tile.float() * g.weight
        if x == g.xs[-1]:  # tile row r is complete: rows above the next tile row are final
            end = g.ys[r + 1] if r + 1 < len(g.ys) else g.ys[-1] + g.th
            self._finalize(self.acc[:, :end - self.top])
            self.acc = self.acc[:, end - self.top:].clone()
            self.top = end

    def _finalize(self, acc: torch.Tensor) -> None:
        H, W = self.size
        n = min(acc.shape[1], H - self.top)
        if n > 0:
            rows = acc[:, :n, :W] / (self.grid.wsum_y[self.top:self.top + n, None] * self.grid.wsum_x[None, :W])
            self.emit(self.top, rows)


# ---- upscale: any size, streamed tile by tile ---------------------------------------------------
@torch.no_grad()
def upscale_stream(backbone, images: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]],
                   emit: Callable[[int, int, torch.Tensor], None], steps: int = 1, *,
                   tile: Optional[int] = 512, tile_overlap: int = 64, vae_tile: Optional[int] = 512,
                   color_fix: str = "wavelet", tile_batch: int = 16, pad_multiple: int = 1,
                   peaks: Optional[Sequence[Optional[int]]] = None, cond=None, generator=None) -> None:
    """Upscale images[k] (C, h, w) — integers in [0, peaks[k]], or float in [-1, 1] where `peaks`
    is None; C = 1 or 3 — to sizes[k] = (H, W) with `backbone`, handing the result to
    `emit(k, top, rows)` in bands of final rows (rows: (3, n, W) float32 in [-1, 1],
    colour-corrected), top to bottom.

    `stream_tiles` with each tile run end to end by `upscale_padded` (VAE encode in `vae_tile`
    tiles -> `steps` Euler steps -> VAE decode)."""
    _check_tiles(tile, tile_overlap, vae_tile)
    if cond is not None and cond.ndim == 4:
        raise ValueError("a spatial condition cannot be streamed tile by tile; pass a per-image one")

    def run(tiles: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return upscale_padded(backbone, tiles, steps, tile=None, tile_overlap=tile_overlap, vae_tile=vae_tile,
                              tile_batch=tile_batch, cond=None if cond is None else cond[index],
                              generator=generator)
    stream_tiles(run, size_multiple(backbone), images, sizes, emit, tile=tile, tile_overlap=tile_overlap,
                 color_fix=color_fix, tile_batch=tile_batch, pad_multiple=pad_multiple, peaks=peaks)


TileFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tiles (N, 3, th, tw), image index (N,)) -> SR


@torch.no_grad()
def stream_tiles(run: TileFn, multiple: int, images: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]],
                 emit: Callable[[int, int, torch.Tensor], None], *, tile: Optional[int] = 512,
                 tile_overlap: int = 64, color_fix: str = "wavelet", tile_batch: int = 16, pad_multiple: int = 1,
                 peaks: Optional[Sequence[Optional[int]]] = None) -> None:
    """The tiling of `upscale_stream` around any one-shot SR function `run(tiles, index)`: tiles
    (N, 3, th, tw) float32 in [-1, 1], the LR resized to the output size, th and tw multiples of
    `multiple`, and the image each tile belongs to -> SR tiles of the same shape in about [-1, 1].

    The images share one padded size (the largest, rounded up to `multiple` and `pad_multiple`)
    and one grid of tiles of `tile` x `tile` pixels (for a thin image, as long as that many pixels
    allow: `tile_shape`) overlapping by `tile_overlap`. Each tile's LR crop is
    resized bicubically on the fly (`BicubicSource`), goes through `run`, and is blended with
    Gaussian weights (MultiDiffusion / StableSR) into a band of rows; a band is final,
    colour-corrected and emitted as soon as no later tile touches it. Peak memory is
    O(tile^2 x tile_batch) for the network plus O(tile x width) per image for the bands (the adain
    colour fix adds one (3, H, W) float16 buffer); nothing else is image-sized.
    """
    _check_tiles(tile, tile_overlap, None)
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"unknown color_fix: {color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
    m = math.lcm(multiple, pad_multiple)
    Hp = _round_up(max(h for h, _ in sizes), m)
    Wp = _round_up(max(w for _, w in sizes), m)
    T = max(multiple, tile // multiple * multiple) if tile else max(Hp, Wp)
    th, tw = tile_shape(Hp, Wp, T, multiple)
    ys = tile_starts(Hp, th, min(tile_overlap, th - 1))
    xs = tile_starts(Wp, tw, min(tile_overlap, tw - 1))
    device = images[0].device
    blender = TileBlender(ys, xs, th, tw, Wp, device=device)
    peaks = peaks or [None] * len(images)
    sources = [BicubicSource(im, size, peak) for im, size, peak in zip(images, sizes, peaks)]
    fixers = [_BandColorFix(color_fix, src, size, functools.partial(emit, k))
              for k, (src, size) in enumerate(zip(sources, sizes))]
    bands = [blender.band(size, functools.partial(_clamped, fixer.add)) for size, fixer in zip(sizes, fixers)]
    boxes = [(r, b, x) for r in range(len(ys)) for b in range(len(images)) for x in xs]
    for i in range(0, len(boxes), tile_batch):
        chunk = boxes[i:i + tile_batch]
        tiles = torch.stack([sources[b].crop(ys[r], ys[r] + th, x, x + tw) for r, b, x in chunk])
        sr = run(tiles, torch.tensor([b for _, b, _ in chunk], device=device))
        for (r, b, x), t in zip(chunk, sr):
            bands[b].add(r, x, t)
    for fixer in fixers:
        fixer.finish()


def _clamped(add, top, rows) -> None:
    add(rows.clamp(-1, 1))


@torch.no_grad()
def upscale(backbone, image: torch.Tensor, scale: float = 4, steps: int = 1, *, tile: Optional[int] = 512,
            tile_overlap: int = 64, vae_tile: Optional[int] = 512, color_fix: str = "wavelet",
            tile_batch: int = 16, out_size: Optional[Tuple[int, int]] = None, pad_multiple: int = 1,
            cond=None, generator=None) -> torch.Tensor:
    """(B, 3, h, w) LR in [-1, 1] -> (B, 3, H, W) SR in [-1, 1], float32, (H, W) = `out_size` or
    `output_size(h, w, scale)` (any scale, non-integer too).

    The LR is resized bicubically to (H, W), replicate-padded to a multiple of the backbone's size
    multiple and of `pad_multiple`, run tile by tile through `upscale_stream` (tiles of `tile`
    output pixels overlapping by `tile_overlap`, VAE tiles of `vae_tile`; None: whole images) and
    colour-corrected against the resized LR. Deterministic. The result is one float32 tensor: for
    large images use `upscale_stream` (or `Upscaler`), which never holds it.
    """
    _check_tiles(tile, tile_overlap, vae_tile)
    H, W = out_size or output_size(image.shape[-2], image.shape[-1], scale)
    out = torch.empty(image.shape[0], 3, H, W, device=image.device)

    def emit(k, top, rows):
        out[k, :, top:top + rows.shape[1]] = rows
    upscale_stream(backbone, list(image), [(H, W)] * image.shape[0], emit, steps, tile=tile,
                   tile_overlap=tile_overlap, vae_tile=vae_tile, color_fix=color_fix, tile_batch=tile_batch,
                   pad_multiple=pad_multiple, cond=cond, generator=generator)
    return out


# ---- arrays <-> tensors -------------------------------------------------------------------------
def array_to_tensor(image: np.ndarray, device=None) -> torch.Tensor:
    """HxWxC uint8 / uint16 (C = 1 or 3) -> (1, 3, H, W) float32 in [-1, 1]; gray is repeated."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8/uint16 HxWx1 or HxWx3, got {image.dtype} {image.shape}")
    peak = np.iinfo(image.dtype).max
    image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()  # torch wants writable
    x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float()
    x = x.expand(-1, 3, -1, -1) if image.shape[2] == 1 else x
    return x / (peak / 2) - 1


def image_source(image: np.ndarray, device=None) -> Tuple[torch.Tensor, int]:
    """HxWxC uint8 / uint16 (C = 1 or 3) -> (C, H, W) integer tensor on `device` (no float copy of
    the image) and its peak value, for `BicubicSource`."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8/uint16 HxWx1 or HxWx3, got {image.dtype} {image.shape}")
    peak = int(np.iinfo(image.dtype).max)
    if image.dtype == np.uint16:  # torch has few uint16 kernels: widen (the LR only, not the output)
        image = image.astype(np.int32)
    elif not image.flags.writeable:
        image = image.copy()  # torch wants a writable array
    return torch.from_numpy(image).to(device).permute(2, 0, 1), peak


def tensor_to_array(x: torch.Tensor, dtype=np.uint8, channels: int = 3) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> HxWxC `dtype` (C = 1: ITU-R 601 luma, as PIL's convert("L"))."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    if channels == 1:
        x = (x * torch.tensor(LUMA_WEIGHTS, device=x.device)[:, None, None]).sum(0, keepdim=True)
    peak = np.iinfo(dtype).max
    return (x * peak).round().clamp(0, peak).permute(1, 2, 0).cpu().numpy().astype(dtype)


# ---- the stateful batch upscaler (Ray batch-inference template) ---------------------------------
def merge_adapters(module: torch.nn.Module) -> int:
    """Fold the active LoRA (peft) adapters into their base weights, for inference only: the
    forward then costs what the base model costs. Returns the number of merged layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    return len(layers)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TileUpscaler:
    """The batch contract of the upscale job's actors, around a tile function: maps a batch dict to
    a batch dict. Runs with or without Ray.

    Batch in: {"image": sequence of HxWxC uint8 / uint16 arrays (C = 1 or 3), ...}.
    Batch out: the same dict with "image" replaced by the SR arrays (same dtype and channel count)
    and "upscale_seconds" (per image; a group's time split evenly). Images are grouped by
    output size rounded up to `bucket` pixels; each group runs as one padded batch, streamed tile by
    tile (`stream_tiles`): memory is bounded by the tiles plus the output arrays themselves.
    A subclass sets `device` and `options` (scale, tile, tile_overlap, color_fix, tile_batch,
    pad_multiple) and gives `_stream`, the network over a group.
    """

    device: torch.device
    options: dict

    def bucket_key(self, image: np.ndarray) -> Tuple[int, int]:
        """Images with equal keys share one padded batch."""
        H, W = output_size(image.shape[0], image.shape[1], self.options["scale"])
        m = self.options["pad_multiple"]
        return _round_up(H, m), _round_up(W, m)

    @torch.no_grad()
    def upscale_images(self, images: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[float]]:
        """SR arrays (same dtype and channels as the inputs) and seconds per image."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.bucket_key(image), []).append(i)
        out, seconds = [None] * len(images), [0.0] * len(images)
        for index in groups.values():
            start = time.perf_counter()
            for i, sr in zip(index, self._upscale_group([images[i] for i in index])):
                out[i] = sr
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            for i in index:
                seconds[i] = (time.perf_counter() - start) / len(index)
        return out, seconds

    def _upscale_group(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """One padded batch streamed tile by tile: each image's rows go straight into its output
        array, the only buffer of the output's size."""
        sizes = [output_size(im.shape[0], im.shape[1], self.options["scale"]) for im in images]
        results = [np.empty((H, W, im.shape[2]), im.dtype) for im, (H, W) in zip(images, sizes)]

        def emit(k, top, rows):
            results[k][top:top + rows.shape[1]] = tensor_to_array(rows, images[k].dtype.type, images[k].shape[2])
        sources = [image_source(im, self.device) for im in images]
        self._stream([src for src, _ in sources], sizes, emit, [peak for _, peak in sources])
        return results

    def _stream(self, images: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]], emit,
                peaks: Sequence[int]) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        images, seconds = self.upscale_images(list(batch["image"]))
        return {**batch, "image": images, "upscale_seconds": np.asarray(seconds)}


class Upscaler(TileUpscaler):
    """Loads a checkpoint once and runs it through `upscale_stream` (the `TileUpscaler` contract).

    LoRA adapters are merged into the base weights (in fp32, before the cast), then bf16 on GPU
    (`dtype`), channels_last, optional `torch.compile` (the inductor cache in `compile_cache_dir`,
    shared by the actors of a node, is reused across runs).
    """

    def __init__(self, checkpoint: str, *, scale: float = 4, steps: int = 1, tile: Optional[int] = 512,
                 tile_overlap: int = 64, vae_tile: Optional[int] = 512, color_fix: str = "wavelet",
                 tile_batch: int = 16, bucket: int = 64, device=None, dtype: Optional[str] = None,
                 compile: bool = False, compile_cache_dir: Optional[str] = None,
                 pretrained: Optional[str] = None, weights: str = "student"):
        from .checkpoint import load_for_inference

        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
        _check_tiles(tile, tile_overlap, vae_tile)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = _DTYPES[dtype or ("bf16" if self.device.type == "cuda" else "fp32")]
        backbone, self.cfg = load_for_inference(checkpoint, device=self.device, pretrained=pretrained,
                                                weights=weights)
        merge_adapters(backbone)
        if _model_dtype(backbone) != self.dtype:
            backbone = backbone.to(self.dtype)
        self.backbone = backbone.to(memory_format=torch.channels_last)
        if compile:
            self._compile(compile_cache_dir)
        self.options = dict(scale=scale, steps=steps, tile=tile, tile_overlap=tile_overlap,
                            vae_tile=vae_tile, color_fix=color_fix, tile_batch=tile_batch, pad_multiple=bucket)

    def _compile(self, cache_dir: Optional[str]) -> None:
        if cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        for name in ("encode", "velocity", "decode"):
            setattr(self.backbone, name, torch.compile(getattr(self.backbone, name)))

    def _stream(self, images, sizes, emit, peaks) -> None:
        o = self.options
        upscale_stream(self.backbone, images, sizes, emit, o["steps"], peaks=peaks, tile=o["tile"],
                       tile_overlap=o["tile_overlap"], vae_tile=o["vae_tile"], color_fix=o["color_fix"],
                       tile_batch=o["tile_batch"], pad_multiple=o["pad_multiple"])


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
