"""The stateful batch upscaler of Ray's batch-inference template, and HxWxC arrays <-> tensors.

`TileUpscaler` maps a batch dict of HxWxC uint8 / uint16 arrays to one of SR arrays, grouping
images by padded output size and streaming each group tile by tile (`flowsr.tiling.stream_tiles`);
a subclass gives the network. `Upscaler` is that class around a FlowSR checkpoint (loaded once,
LoRA merged, cast, optionally compiled) run by `flowsr.sample.upscale_stream`. Both run with or
without Ray.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .color import check_color_fix
from .sample import model_dtype, upscale_stream
from .tiling import check_tiles, output_size, round_up

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's RGB -> L


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
        return round_up(H, m), round_up(W, m)

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

        check_color_fix(color_fix)
        check_tiles(tile, tile_overlap, vae_tile)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = _DTYPES[dtype or ("bf16" if self.device.type == "cuda" else "fp32")]
        backbone, self.cfg = load_for_inference(checkpoint, device=self.device, pretrained=pretrained,
                                                weights=weights)
        merge_adapters(backbone)
        if model_dtype(backbone) != self.dtype:
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
