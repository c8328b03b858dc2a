"""One seam for the models that the upscale and evaluate jobs run.

`-m MODEL` is either a FlowSR checkpoint (a folder or URI holding `config.json`) or a weights
file that `spandrel` recognises (`.pth`, `.pt`, `.ckpt`, `.safetensors`: Real-ESRGAN / ESRGAN
RRDBNet, SwinIR, HAT, DAT, OmniSR, SPAN, ...; the core `spandrel` package only, not
`spandrel-extra-arches`). `load_upscaler` returns an object with the interface of
`flowsr.sample.Upscaler` (`upscale_images`, `bucket_key`, `__call__`), so the job machinery
(decode, actor pool, alpha, 16 bits, formats, manifest, resume) is the same for both kinds.

Tile sizes here are in input (LR) pixels, as Real-ESRGAN's `--tile` / `--tile_pad`; for FlowSR
they are converted to the output pixels that `flowsr.sample` works in. A weights file's native
scale is read from the file; another `scale` resizes the model's output (bicubic, antialiased),
as Real-ESRGAN's `--outscale` does (with Lanczos there).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from pipeline.storage import is_local, resolve_fs

from flowsr.sample import LUMA_WEIGHTS, Upscaler, default_device, output_size, tiled_apply

WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
FLOWSR_CONFIG = "config.json"  # what makes a folder a FlowSR checkpoint (flowsr.checkpoint.CONFIG_NAME)
FLOWSR, WEIGHTS = "flowsr", "weights"  # the two kinds of model
DEFAULT_FLOWSR_SCALE = 4.0  # a FlowSR checkpoint runs at any scale; this one unless told
RUNNABLE_PURPOSES = ("SR", "Restoration")  # image -> image models (Restoration: scale 1)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(ValueError):
    """A model argument that names no model these jobs can run; the message is one line."""


@dataclass(frozen=True)
class ModelInfo:
    uri: str
    kind: str  # FLOWSR | WEIGHTS
    native_scale: Optional[int]  # None: any scale (FlowSR)
    name: str  # e.g. "FlowSR", "ESRGAN (64nf, 23nb, SR x4)"
    tiling: str = "supported"  # spandrel's hint: supported | discouraged | internal (the model tiles itself)

    def scale(self, requested: Optional[float] = None) -> float:
        """The output / input size a job uses: `requested`, else the native scale."""
        return float(requested or self.native_scale or DEFAULT_FLOWSR_SCALE)


# ---- which kind of model -----------------------------------------------------------------------
def model_kind(uri: str) -> str:
    """FLOWSR for a folder with `config.json`, WEIGHTS for a weights-file name; else ModelError."""
    ext = os.path.splitext(uri.rstrip("/"))[1].lower()
    if ext in WEIGHT_SUFFIXES:
        return WEIGHTS
    fs, path = resolve_fs(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        if fs.get_file_info(f"{path.rstrip('/')}/{FLOWSR_CONFIG}").type == pafs.FileType.File:
            return FLOWSR
        raise ModelError(f"{uri} is a folder but not a FlowSR checkpoint (no {FLOWSR_CONFIG} in it)")
    if kind == pafs.FileType.File:
        raise ModelError(f"unsupported model file {uri}: give a FlowSR checkpoint folder or an SR weights file "
                         f"that spandrel reads ({', '.join(WEIGHT_SUFFIXES)})")
    raise ModelError(f"no model at {uri}: give a FlowSR checkpoint folder or an SR weights file "
                     f"({', '.join(WEIGHT_SUFFIXES)})")


def local_weights(uri: str) -> str:
    """A local path of weights file `uri`: the file itself, or a copy of a remote one (made once
    per process, in a temporary folder)."""
    if is_local(uri):
        path = resolve_fs(uri)[1]
        if not os.path.isfile(path):
            raise ModelError(f"no weights file at {uri}")
        return path
    if uri not in _DOWNLOADED:
        fs, path = resolve_fs(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ModelError(f"no weights file at {uri}")
        local = os.path.join(tempfile.mkdtemp(prefix="flowsr-weights-"), os.path.basename(path))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        _DOWNLOADED[uri] = local
    return _DOWNLOADED[uri]


_DOWNLOADED: Dict[str, str] = {}


def load_weights(uri: str, device=None):
    """A spandrel `ImageModelDescriptor` (eval mode, on `device`) of weights file `uri`; a file
    spandrel cannot read, or a model that is not image -> image, is a one-line ModelError."""
    import spandrel

    path = local_weights(uri)
    try:
        model = spandrel.ModelLoader(device=device or "cpu").load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise ModelError(f"{uri}: not an architecture spandrel knows (the core spandrel package reads "
                         "Real-ESRGAN/ESRGAN, SwinIR, HAT, DAT, OmniSR, SPAN, ...)") from None
    except Exception as err:  # noqa: BLE001 — a corrupt, foreign or mis-shaped file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(f"{uri}: spandrel cannot load it ({type(err).__name__}: {reason})") from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose not in RUNNABLE_PURPOSES:
        raise ModelError(f"{uri}: a {model.architecture.name} {model.purpose} model; these jobs run image -> image "
                         f"super-resolution models")
    if model.input_channels not in (1, 3) or model.output_channels not in (1, 3):
        raise ModelError(f"{uri}: a {model.input_channels} -> {model.output_channels} channel model; "
                         f"gray or RGB models only")
    return model.eval()


def _describe_weights(uri: str, model) -> ModelInfo:
    tags = ", ".join([*model.tags, f"{model.purpose} x{model.scale}"])
    return ModelInfo(uri, WEIGHTS, int(model.scale), f"{model.architecture.name} ({tags})", model.tiling.name.lower())


def describe(uri: str) -> ModelInfo:
    """What `uri` is and its native scale (a weights file is loaded on the CPU to read it)."""
    if model_kind(uri) == FLOWSR:
        return ModelInfo(uri, FLOWSR, None, "FlowSR")
    return _describe_weights(uri, load_weights(uri))


# ---- weights files through spandrel --------------------------------------------------------------
def _pick_dtype(model, requested: Optional[str], device: torch.device) -> torch.dtype:
    """`requested`, if the architecture supports it; default bf16 (else fp16) on GPU, fp32 on CPU."""
    if requested is not None:
        if requested not in _DTYPES:
            raise ModelError(f"unknown dtype: {requested!r} (choose from {', '.join(_DTYPES)})")
        supported = {"bf16": model.supports_bfloat16, "fp16": model.supports_half, "fp32": True}[requested]
        if not supported:
            raise ModelError(f"{model.architecture.name} does not support {requested} (spandrel); "
                             "give --dtype fp32 or leave --dtype unset")
        return _DTYPES[requested]
    if device.type == "cuda":
        if model.supports_bfloat16:
            return torch.bfloat16
        if model.supports_half:
            return torch.float16
    return torch.float32


def _fit_tile(tile: Optional[int], model) -> Optional[int]:
    """`tile` rounded up to the model's size requirements (a multiple of `multiple_of`, at least
    `minimum`), so that spandrel does not pad every tile; None / 0: whole images."""
    if not tile:
        return None
    req = model.size_requirements
    return max(req.minimum, -(-tile // req.multiple_of) * req.multiple_of)


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad (B, C, h, w) by `pad` at the bottom and right: reflect as far as it goes, then replicate
    (Real-ESRGAN's --pre_pad; spandrel pads to its size requirements the same way)."""
    if not pad:
        return x
    rh, rw = min(pad, x.shape[-2] - 1), min(pad, x.shape[-1] - 1)
    x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    return F.pad(x, (0, pad - rw, 0, pad - rh), mode="replicate") if (rh, rw) != (pad, pad) else x


class WeightsUpscaler:
    """A spandrel model with the interface of `flowsr.sample.Upscaler`. Runs with or without Ray.

    `upscale_images` maps HxWxC uint8 / uint16 arrays (C = 1 or 3) to SR arrays of the same
    dtype and channel count at `output_size(h, w, scale)`. Images of equal size run as one
    batch; each is cut into `tile` x `tile` input-pixel tiles overlapping by `tile_overlap`
    (blended with Gaussian weights, `flowsr.sample.tiled_apply`), `tile_batch` tiles per forward.
    Tiles are rounded up to the model's size requirements; a model that spandrel marks as tiling
    internally runs on whole images. The model sees exactly what a direct spandrel call sees
    (values in [0, 1], its dtype); a gray image is repeated to RGB for an RGB model and its
    output reduced to luma (ITU-R 601).
    """

    def __init__(self, weights: str, *, scale: Optional[float] = None, tile: Optional[int] = None,
                 tile_overlap: int = 16, tile_batch: int = 16, pre_pad: int = 0, device=None,
                 dtype: Optional[str] = None, compile: bool = False, compile_cache_dir: Optional[str] = None):
        if tile and tile <= tile_overlap:
            raise ModelError(f"tile={tile} must be larger than tile_overlap={tile_overlap}")
        if tile_overlap < 0 or pre_pad < 0:
            raise ModelError(f"tile_overlap and pre_pad must be >= 0, got {tile_overlap}, {pre_pad}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = load_weights(weights, self.device)
        self.dtype = _pick_dtype(self.model, dtype, self.device)
        self.model.to(self.dtype)
        if self.device.type == "cuda":
            self.model.model.to(memory_format=torch.channels_last)
        if compile:
            if compile_cache_dir:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir)
            self.model.model.compile()
        self.info = _describe_weights(weights, self.model)
        self.scale = self.info.scale(scale)
        self.tile = _fit_tile(tile, self.model) if self.info.tiling != "internal" else None
        self.tile_overlap, self.tile_batch, self.pre_pad = tile_overlap, tile_batch, pre_pad

    @torch.no_grad()
    def upscale_tensor(self, x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, C, h, w) float in [0, 1] (C = the model's input channels) -> (B, C', H, W) float32 in
        [0, 1], (H, W) = `out_size` or `output_size(h, w, scale)`."""
        h, w = x.shape[-2:]
        s = self.model.scale
        out_size = tuple(out_size or output_size(h, w, self.scale))

        def run(tiles, boxes):
            tiles = tiles.to(self.device, self.dtype)
            if self.device.type == "cuda":
                tiles = tiles.contiguous(memory_format=torch.channels_last)
            return self.model(tiles)

        padded = _reflect_pad(x.float(), self.pre_pad)
        y = tiled_apply(run, padded, self.tile, self.tile_overlap, unit_out=s, tile_batch=self.tile_batch)
        y = y[..., :h * s, :w * s]
        if out_size != (h * s, w * s):
            y = F.interpolate(y, size=out_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return y

    def _to_model_channels(self, x: torch.Tensor) -> torch.Tensor:
        c = self.model.input_channels
        if x.shape[1] == c:
            return x
        if c == 3:
            return x.expand(-1, 3, -1, -1)
        return (x * torch.tensor(LUMA_WEIGHTS, device=x.device)[:, None, None]).sum(1, keepdim=True)

    def bucket_key(self, image: np.ndarray) -> Tuple[int, int]:
        """Images with equal keys share one batch: equal input sizes (no padding, so a batched image
        gets exactly what it would get alone)."""
        return int(image.shape[0]), int(image.shape[1])

    @torch.no_grad()
    def upscale_images(self, images: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[float]]:
        """SR arrays (same dtype and channels as the inputs) and seconds per image."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image in enumerate(images):
            if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in (1, 3):
                raise ValueError(f"expected uint8/uint16 HxWx1 or HxWx3, got {image.dtype} {image.shape}")
            groups.setdefault(self.bucket_key(image), []).append(i)
        out, seconds = [None] * len(images), [0.0] * len(images)
        for index in groups.values():
            start = time.perf_counter()
            x = torch.cat([self._to_model_channels(_to_unit(images[i], self.device)) for i in index])
            y = self.upscale_tensor(x)
            for k, i in enumerate(index):
                out[i] = _from_unit(y[k], images[i].dtype, images[i].shape[2])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            for i in index:
                seconds[i] = (time.perf_counter() - start) / len(index)
        return out, seconds

    def __call__(self, batch: dict) -> dict:
        images, seconds = self.upscale_images(list(batch["image"]))
        return {**batch, "image": images, "upscale_seconds": np.asarray(seconds)}


def _to_unit(image: np.ndarray, device) -> torch.Tensor:
    """HxWxC uint8 / uint16 -> (1, C, H, W) float32 in [0, 1] (value / peak)."""
    peak = np.iinfo(image.dtype).max
    array = np.ascontiguousarray(image)
    array = array if array.flags.writeable else array.copy()
    return torch.from_numpy(array).to(device).permute(2, 0, 1)[None].float() / peak


def _from_unit(y: torch.Tensor, dtype, channels: int) -> np.ndarray:
    """(C, H, W) in [0, 1] -> HxW x `channels` `dtype` (3 -> 1: luma; 1 -> 3: repeated), rounded."""
    if channels == 1 and y.shape[0] == 3:
        y = (y * torch.tensor(LUMA_WEIGHTS, device=y.device)[:, None, None]).sum(0, keepdim=True)
    elif channels == 3 and y.shape[0] == 1:
        y = y.expand(3, -1, -1)
    peak = np.iinfo(dtype).max
    return (y.float() * peak).round().clamp(0, peak).permute(1, 2, 0).cpu().numpy().astype(dtype)


# ---- the seam ---------------------------------------------------------------------------------------
def _output_pixels(pixels: Optional[int], scale: float) -> Optional[int]:
    return round(pixels * scale) if pixels else pixels


def load_upscaler(model: str, *, scale: Optional[float] = None, tile: Optional[int] = None,
                  tile_overlap: int = 16, tile_batch: int = 16, pre_pad: int = 0, device=None,
                  dtype: Optional[str] = None, compile: bool = False, compile_cache_dir: Optional[str] = None,
                  bucket: int = 64, steps: int = 1, vae_tile: Optional[int] = 512, color_fix: str = "wavelet",
                  pretrained: Optional[str] = None, weights: str = "student"):
    """The upscaler of `model` (a FlowSR checkpoint or a spandrel weights file), loaded once.

    `tile` / `tile_overlap` / `pre_pad` are in input pixels. The FlowSR-only options (`bucket`
    and `vae_tile` in output pixels, `steps`, `color_fix`, `pretrained`, `weights`) do not apply
    to a weights file, which runs as spandrel runs it.
    """
    common = dict(tile_batch=tile_batch, device=device, dtype=dtype, compile=compile,
                  compile_cache_dir=compile_cache_dir)
    if model_kind(model) == WEIGHTS:
        return WeightsUpscaler(model, scale=scale, tile=tile, tile_overlap=tile_overlap, pre_pad=pre_pad, **common)
    if pre_pad:
        raise ModelError("pre_pad applies to weights files; a FlowSR checkpoint pads its input itself")
    scale = float(scale or DEFAULT_FLOWSR_SCALE)
    return Upscaler(model, scale=scale, tile=_output_pixels(tile, scale),
                    tile_overlap=_output_pixels(tile_overlap, scale), vae_tile=vae_tile, bucket=bucket,
                    steps=steps, color_fix=color_fix, pretrained=pretrained, weights=weights, **common)

