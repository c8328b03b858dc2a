"""Run a FlowSR checkpoint from Python in three lines:

    from flowsr.api import FlowSRUpscaler
    upscaler = FlowSRUpscaler.from_pretrained("runs/flowsr-paper/stage2/checkpoint_0020000")
    upscaler(Image.open("in.png")).save("out.png")

A thin layer over `flowsr.upscaler.Upscaler` (the class the upscale job's actors run), so a
result here equals the job's for the same options. Checkpoints at a URI: copy them first with
`pipeline.storage.cached_copy(uri)`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .tiling import output_size
from .upscaler import Upscaler

_DIRECT_MODES = {"RGB": 3, "L": 1}


class FlowSRUpscaler:
    """PIL image in, PIL image out. Keeps RGB / L as they are, upscales an alpha channel
    bicubically beside the colours, and carries the ICC profile of the input to the output."""

    def __init__(self, upscaler: Upscaler):
        self.upscaler = upscaler

    @classmethod
    def from_pretrained(cls, checkpoint: str, **options) -> "FlowSRUpscaler":
        """`options` are `flowsr.upscaler.Upscaler`'s: scale, steps, tile, color_fix, device, dtype,
        pretrained (the SD base model location, overriding the checkpoint's), weights, ..."""
        return cls(Upscaler(checkpoint, **options))

    @property
    def scale(self) -> float:
        return self.upscaler.options["scale"]

    def __call__(self, image, *, scale: Optional[float] = None):
        """The super-resolved PIL image (`scale` defaults to the upscaler's)."""
        from PIL import Image

        if scale is not None and scale != self.scale:
            raise ValueError(f"this upscaler was built for scale {self.scale}; build another for {scale}")
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
        mode = image.mode if image.mode in _DIRECT_MODES else ("L" if image.mode in ("LA", "I", "I;16", "F") else "RGB")
        array = np.asarray(image.convert(mode))
        array = array[:, :, None] if array.ndim == 2 else array
        sr = self.upscaler({"image": [array]})["image"][0]
        out = Image.fromarray(sr[:, :, 0] if sr.shape[2] == 1 else sr, mode)
        if alpha is not None:
            H, W = output_size(image.height, image.width, self.scale)
            out.putalpha(alpha.resize((W, H), Image.BICUBIC))
        if image.info.get("icc_profile"):
            out.info["icc_profile"] = image.info["icc_profile"]
        return out
