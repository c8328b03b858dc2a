"""The onnxruntime backend of the upscale job: a FlowSR one-step export (`flowsr export`) run
tile by tile, with the tiling, blending, colour fix and batch contract of `flowsr.upscaler.Upscaler`.

Only the network runs in onnxruntime; the bicubic resize of each tile, the Gaussian blend and
the colour fix stay the project's torch code (`flowsr.tiling.stream_tiles`), so a result differs
from the torch backend's only by the network's float error (within one 8-bit level).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from flowsr.color import COLOR_FIXES
from flowsr.export import INPUT_NAME, OUTPUT_NAME, ExportError, read_contract, session
from flowsr.tiling import stream_tiles
from flowsr.upscaler import TileUpscaler

CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"


def providers_for(device: Optional[torch.device]) -> Tuple[str, ...]:
    """onnxruntime execution providers for `device`: CUDA first when asked for and installed
    (the `onnxruntime-gpu` package; asked for and missing: ValueError), the CPU always as the
    fallback. `device` None: CUDA when a GPU and that provider are both there, else the CPU."""
    import onnxruntime as ort

    if device is None:
        usable = torch.cuda.is_available() and CUDA_PROVIDER in ort.get_available_providers()
        return (CUDA_PROVIDER, CPU_PROVIDER) if usable else (CPU_PROVIDER,)
    if device.type == "cuda":
        if CUDA_PROVIDER not in ort.get_available_providers():
            raise ValueError(f"{CUDA_PROVIDER} is not available in this onnxruntime "
                             f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu or run on the CPU")
        return CUDA_PROVIDER, CPU_PROVIDER
    return (CPU_PROVIDER,)


class OnnxUpscaler(TileUpscaler):
    """An exported one-step model (`flowsr.export`) behind the `TileUpscaler` batch contract.

    `tile` and `tile_overlap` are in output pixels (tiles are cut to the file's size multiple),
    `bucket` rounds output sizes into padded batches, as `flowsr.upscaler.Upscaler`. The session
    uses `threads` intra-op threads (default: torch's thread count, which Ray sets to the
    actor's CPUs, so both backends get the same CPU budget)."""

    def __init__(self, model: str, *, scale: float = 4, tile: Optional[int] = 512, tile_overlap: int = 64,
                 color_fix: str = "wavelet", tile_batch: int = 16, bucket: int = 64, device=None,
                 threads: Optional[int] = None):
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
        if tile and tile <= tile_overlap:
            raise ValueError(f"tile={tile} must be larger than tile_overlap={tile_overlap}")
        try:
            self.contract = read_contract(model)
        except ExportError as err:
            raise ValueError(str(err)) from None
        self.multiple = int(self.contract["size_multiple"])
        self.providers = providers_for(torch.device(device) if device is not None else None)
        self.session = session(model, self.providers, threads or torch.get_num_threads())
        self.device = torch.device("cpu")  # the tiles are cut and blended on the CPU; onnxruntime moves them
        self.options = dict(scale=scale, tile=tile, tile_overlap=tile_overlap, color_fix=color_fix,
                            tile_batch=tile_batch, pad_multiple=bucket)

    def run_tiles(self, tiles: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, 3, H, W) float32 in [-1, 1], the LR at the output size -> SR (N, 3, H, W)."""
        x = tiles.float().contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    def _stream(self, images: Sequence[torch.Tensor], sizes, emit, peaks) -> None:
        o = self.options
        stream_tiles(self.run_tiles, self.multiple, images, sizes, emit, tile=o["tile"],
                     tile_overlap=o["tile_overlap"], color_fix=o["color_fix"], tile_batch=o["tile_batch"],
                     pad_multiple=o["pad_multiple"], peaks=peaks)
