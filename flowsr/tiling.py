"""Tiles: how an image of any size is cut into overlapping tiles, run, and blended back.

Sizes (`output_size`, `pad_to`), the tile grid (`tile_starts`, `tile_shape`: a tile is a budget of
tile^2 pixels), Gaussian blending weights (MultiDiffusion / StableSR), `tiled_apply` for whole
tensors, and the streaming pieces that never hold an image-sized float buffer: `BicubicSource`
(the LR resized bicubically one crop at a time), `TileBlender` / `BlendedBand` (tiles in, final
rows out) and `stream_tiles`, which runs any tile function over them and colour-corrects the
rows as they become final (`flowsr.color.BandColorFix`).

Images are (B, 3, H, W) float tensors in [-1, 1] unless stated otherwise.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .color import BandColorFix, check_color_fix

GAUSSIAN_TILE_SIGMA = 0.1  # std of the blending weights, as a fraction of the tile size (StableSR var=0.01)
BICUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


# ---- sizes --------------------------------------------------------------------------------------
def output_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    """(H, W) = (h, w) * scale, rounded half up, at least 1 pixel: the one rule for output sizes."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, math.floor(h * scale + 0.5)), max(1, math.floor(w * scale + 0.5))


def round_up(n: int, m: int) -> int:
    """The smallest multiple of `m` that is >= `n`."""
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


def check_tiles(tile, tile_overlap, vae_tile) -> None:
    """Raise ValueError unless the tile sizes (None: whole images) exceed a non-negative overlap."""
    for name, value in (("tile", tile), ("vae_tile", vae_tile)):
        if value and value <= tile_overlap:
            raise ValueError(f"{name}={value} must be larger than tile_overlap={tile_overlap}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")


# ---- bicubic resize on the fly (the LR at the output size, one band at a time) -----------------
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
    [-1, 1] (= `pad_to(flowsr.sample.resize_to(src, size), ...)`), read one crop at a time: a crop
    costs memory in its own size, never the resized image's. Gray (C = 1) is repeated to 3 channels."""

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


# ---- streaming: tiles in, blended and colour-corrected rows out ---------------------------------
TileFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tiles (N, 3, th, tw), image index (N,)) -> SR


@torch.no_grad()
def stream_tiles(run: TileFn, multiple: int, images: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]],
                 emit: Callable[[int, int, torch.Tensor], None], *, tile: Optional[int] = 512,
                 tile_overlap: int = 64, color_fix: str = "wavelet", tile_batch: int = 16, pad_multiple: int = 1,
                 peaks: Optional[Sequence[Optional[int]]] = None) -> None:
    """The tiling of `flowsr.sample.upscale_stream` around any one-shot SR function `run(tiles, index)`: tiles
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
    check_tiles(tile, tile_overlap, None)
    check_color_fix(color_fix)
    m = math.lcm(multiple, pad_multiple)
    Hp = round_up(max(h for h, _ in sizes), m)
    Wp = round_up(max(w for _, w in sizes), m)
    T = max(multiple, tile // multiple * multiple) if tile else max(Hp, Wp)
    th, tw = tile_shape(Hp, Wp, T, multiple)
    ys = tile_starts(Hp, th, min(tile_overlap, th - 1))
    xs = tile_starts(Wp, tw, min(tile_overlap, tw - 1))
    device = images[0].device
    blender = TileBlender(ys, xs, th, tw, Wp, device=device)
    peaks = peaks or [None] * len(images)
    sources = [BicubicSource(im, size, peak) for im, size, peak in zip(images, sizes, peaks)]
    fixers = [BandColorFix(color_fix, src, size, functools.partial(emit, k))
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
