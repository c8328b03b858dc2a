"""Inference: LR image -> SR image with 1 or N Euler steps of the SR flow.

`super_resolve` runs the flow on a batch already resized to the HR size. `upscale` adds what a
real image needs: any input size and scale factor (the LR is resized bicubically to the target
size, as the paper does), overlapping tiles run end to end and blended with Gaussian weights,
and colour correction against the upscaled LR. `upscale_stream` does the same without holding an
image-sized float buffer (the tiling and blending are `flowsr.tiling`, the colour fixes
`flowsr.color`; the stateful batch callable around it is `flowsr.upscaler.Upscaler`).

Images are (B, 3, H, W) float tensors in [-1, 1] unless stated otherwise. Tile sizes are in
output (HR) pixels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import flow
from .tiling import check_tiles, crop_boxes, output_size, stream_tiles, tiled_apply


def resize_to(lr: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize of (B, 3, h, w) in [-1, 1] to `size` = (H, W) (the paper's LR upscaling)."""
    return F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def super_resolve(backbone, lr_up: torch.Tensor, steps: int = 1, cond=None, generator=None) -> torch.Tensor:
    """(B, 3, H, W) LR already at the HR size, in [-1, 1] -> SR in [-1, 1].
    Runs encode -> `steps` Euler steps from t=1 to t=0 -> decode."""
    x1, cond = flow_start(backbone, backbone.encode(lr_up), cond, generator)
    return backbone.decode(flow.sample(backbone.velocity, x1, steps, cond)).clamp(-1, 1)


def flow_start(backbone, z: torch.Tensor, cond=None, generator=None):
    """(x1, cond): where the flow starts from the LR latent `z`, and its condition. The SR flow
    starts at `z`; the Table-2 ablations start from noise (or noised LR) with `z` as condition."""
    if backbone.cfg.flow_source == "sr_flow":
        return z, cond
    eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
    x1 = eps if backbone.cfg.flow_source == "noise" else z + backbone.cfg.noised_lr_sigma * eps
    return x1, z


def size_multiple(backbone) -> int:
    """Pixel multiple the backbone needs: VAE factor x the velocity UNet's down-sampling factor."""
    net = getattr(backbone, "unet", None) or getattr(backbone, "net", None)
    blocks = getattr(getattr(net, "config", None), "block_out_channels", None)
    return backbone.latent_factor * (2 ** (len(blocks) - 1) if blocks else 1)


# ---- upscale: any size, tiled -------------------------------------------------------------------
def model_dtype(backbone) -> torch.dtype:
    """The dtype of the backbone's first parameter (float32 when it has none)."""
    p = next(iter(backbone.parameters()), None) if hasattr(backbone, "parameters") else None
    return p.dtype if p is not None else torch.float32


def _cells(pixels: Optional[int], unit: int, multiple: int = 1) -> Optional[int]:
    """A tile size in output pixels as grid cells of `unit` pixels, a multiple of `multiple`."""
    if not pixels:
        return None
    return max(multiple, pixels // unit // multiple * multiple)


@torch.no_grad()
def upscale_padded(backbone, lr_up: torch.Tensor, steps: int = 1, *, tile: Optional[int] = 512,
                   tile_overlap: int = 64, vae_tile: Optional[int] = 512, tile_batch: int = 16,
                   cond=None, generator=None) -> torch.Tensor:
    """SR flow on (B, 3, H, W) LR at the HR size, H and W multiples of `size_multiple(backbone)`:
    tiled VAE encode -> `steps` Euler steps with a tiled velocity -> tiled VAE decode.
    Returns float32 SR in [-1, 1], not colour-corrected."""
    f, m = backbone.latent_factor, size_multiple(backbone) // backbone.latent_factor
    dtype = model_dtype(backbone)
    cells_v, over_v = _cells(tile, f, m), tile_overlap // f
    cells_vae = _cells(vae_tile, f)

    def prep(tiles):
        return tiles.to(dtype).contiguous(memory_format=torch.channels_last)

    def encode(tiles, boxes):
        return backbone.encode(prep(tiles))

    def decode(tiles, boxes):
        return backbone.decode(prep(tiles))

    z = tiled_apply(encode, lr_up, cells_vae, over_v, unit_in=f, tile_batch=tile_batch)
    x1, cond = flow_start(backbone, z, cond, generator)

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
    check_tiles(tile, tile_overlap, vae_tile)
    if cond is not None and cond.ndim == 4:
        raise ValueError("a spatial condition cannot be streamed tile by tile; pass a per-image one")

    def run(tiles: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return upscale_padded(backbone, tiles, steps, tile=None, tile_overlap=tile_overlap, vae_tile=vae_tile,
                              tile_batch=tile_batch, cond=None if cond is None else cond[index],
                              generator=generator)
    stream_tiles(run, size_multiple(backbone), images, sizes, emit, tile=tile, tile_overlap=tile_overlap,
                 color_fix=color_fix, tile_batch=tile_batch, pad_multiple=pad_multiple, peaks=peaks)


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
    check_tiles(tile, tile_overlap, vae_tile)
    H, W = out_size or output_size(image.shape[-2], image.shape[-1], scale)
    out = torch.empty(image.shape[0], 3, H, W, device=image.device)

    def emit(k, top, rows):
        out[k, :, top:top + rows.shape[1]] = rows
    upscale_stream(backbone, list(image), [(H, W)] * image.shape[0], emit, steps, tile=tile,
                   tile_overlap=tile_overlap, vae_tile=vae_tile, color_fix=color_fix, tile_batch=tile_batch,
                   pad_multiple=pad_multiple, cond=cond, generator=generator)
    return out

