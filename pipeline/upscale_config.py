"""The bulk upscale job's configuration: one frozen dataclass, validated in one place.

`UpscaleJobConfig` holds what `python -m jobs.upscale` / `flowsr upscale` take (`jobs.upscale`
builds it from the command line); `record()` is what the output layer compares on a rerun
(RESULT_FIELDS and the checkpoint's digest), `upscaler_options()` what
`pipeline.sr_models.load_upscaler` takes. No torch or Ray here: the job builds and checks a
config before anything heavy is loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pipeline import output as out
from pipeline.fingerprint import checkpoint_digest
from pipeline.inputs import MAX_BYTES, MAX_OUTPUT_PIXELS, MAX_PIXELS
from pipeline.naming import OUTPUT_FORMATS

BACKENDS = ("torch", "onnxruntime")  # = pipeline.sr_models.BACKENDS (not imported here: it loads torch)
MAX_SCALE = 16.0  # output / input size; beyond it the bicubic start carries no information
# UpscaleJobConfig fields that change the output pixels or names (the run record's params).
RESULT_FIELDS = ("scale", "steps", "tile", "tile_overlap", "pre_pad", "vae_tile", "color_fix", "format",
                 "suffix", "dtype", "pretrained", "weights")


@dataclass(frozen=True)
class UpscaleJobConfig:
    input: str
    output: str
    checkpoint: str  # a FlowSR checkpoint or an SR weights file (pipeline.sr_models)
    scale: Optional[float] = None  # None: the model's native scale (4 for FlowSR)
    steps: int = 1
    tile: int = 128  # input (LR) pixels, as Real-ESRGAN's --tile; 0 = whole images
    tile_overlap: int = 16  # input pixels, as Real-ESRGAN's --tile_pad
    pre_pad: int = 0  # input pixels of reflection at the bottom and right (weights files)
    vae_tile: int = 512  # output pixels (FlowSR)
    color_fix: str = "wavelet"
    format: str = "same"
    suffix: str = ""
    path_column: str = "path"  # for a Parquet input
    manifest: Optional[str] = None  # default OUT/manifest.parquet
    batch_size: int = 8  # images per upscaler call
    tile_batch: int = 16  # tiles per network forward
    bucket: int = 64  # output sizes rounded up to this share a padded batch
    pool_size: Optional[int] = None  # None: one actor per GPU of the cluster (pipeline.actors.gpu_pool_size)
    num_gpus: Optional[float] = None  # per actor; None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    dtype: Optional[str] = None  # bf16 | fp16 | fp32; None: bf16 on GPU, fp32 on CPU
    compile: bool = False
    compile_cache_dir: Optional[str] = None
    pretrained: Optional[str] = None  # override the SD base model location in the checkpoint
    weights: str = "student"  # student | target (EMA)
    backend: Optional[str] = None  # torch | onnxruntime; None: by the model (onnxruntime for an .onnx export)
    max_pixels: int = MAX_PIXELS  # input pixels (from the header, before decode)
    max_output_pixels: int = MAX_OUTPUT_PIXELS  # output pixels
    max_bytes: int = MAX_BYTES  # input file size
    glob: Optional[bool] = None  # None: a path that exists is literal, else a glob; True: always a glob
    allow_errors: bool = False  # exit 0 even when some inputs failed
    address: Optional[str] = None
    fail_after: int = -1  # test switch: an upscaler actor crashes after this many images
    overwrite: bool = False  # replace the output's earlier results instead of resuming them

    def __post_init__(self):
        from flowsr.color import COLOR_FIXES  # torch: only when a config is built

        if self.scale is not None and not (math.isfinite(self.scale) and 0 < self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be a finite number in (0, {MAX_SCALE:g}], got {self.scale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.vae_tile < 0:
            raise ValueError(f"vae_tile must be >= 0, got {self.vae_tile}")
        if min(self.max_pixels, self.max_output_pixels, self.max_bytes) < 1:
            raise ValueError("max_pixels, max_output_pixels and max_bytes must be >= 1")
        if self.format == "auto":  # Real-ESRGAN's name for "the input's format"
            object.__setattr__(self, "format", "same")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format: {self.format!r} (choose from {', '.join(OUTPUT_FORMATS)})")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend: {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown color_fix: {self.color_fix!r} (choose from {', '.join(COLOR_FIXES)})")
        if min(self.batch_size, self.tile_batch, self.bucket,
               1 if self.pool_size is None else self.pool_size) < 1:
            raise ValueError("batch_size, tile_batch, bucket and pool_size must be >= 1")
        if min(self.tile, self.tile_overlap, self.pre_pad) < 0 or (self.tile and self.tile <= self.tile_overlap):
            raise ValueError(f"need tile > tile_overlap >= 0 (or tile 0) and pre_pad >= 0, got tile={self.tile}, "
                             f"tile_overlap={self.tile_overlap}, pre_pad={self.pre_pad}")

    def record(self) -> dict:
        """The run record (`pipeline.output`): what decides the output pixels, and the checkpoint's
        digest. A rerun into the same OUT with other values is refused (`--overwrite` to replace)."""
        params = {name: getattr(self, name) for name in RESULT_FIELDS}
        try:
            checkpoint = checkpoint_digest(self.checkpoint)
        except out.OutputError:  # a model name, not a path: recorded as given
            checkpoint = self.checkpoint
        return out.run_record("upscale", self.input, params, checkpoint)

    def upscaler_options(self) -> dict:
        """Keyword arguments of `pipeline.sr_models.load_upscaler` (tiles in input pixels)."""
        return dict(scale=self.scale, steps=self.steps, tile=self.tile or None, tile_overlap=self.tile_overlap,
                    pre_pad=self.pre_pad, vae_tile=self.vae_tile or None, color_fix=self.color_fix,
                    tile_batch=self.tile_batch, bucket=self.bucket, dtype=self.dtype, compile=self.compile,
                    compile_cache_dir=self.compile_cache_dir, pretrained=self.pretrained, weights=self.weights,
                    backend=self.backend)

    @property
    def name_suffix(self) -> str:
        """What output stems get: `_` + suffix, as Real-ESRGAN names img.png -> img_out.png."""
        return f"_{self.suffix}" if self.suffix else ""
