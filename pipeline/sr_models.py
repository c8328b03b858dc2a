"""One seam for the models that the upscale and evaluate jobs run.

`-m MODEL` is a FlowSR checkpoint (a folder or URI holding `config.json`), a weights file that
`spandrel` recognises (`.pth`, `.pt`, `.ckpt`, `.safetensors`: Real-ESRGAN / ESRGAN RRDBNet,
SwinIR, HAT, DAT, OmniSR, SPAN, ...; the core `spandrel` package only, not
`spandrel-extra-arches`), or a FlowSR one-step export (`.onnx`, `flowsr export`), which runs in
onnxruntime (backend `onnxruntime`; the other two run in torch). `load_upscaler` returns an
object with the interface of `flowsr.upscaler.Upscaler` (`upscale_images`, `bucket_key`,
`__call__`), so the job machinery (decode, actor pool, alpha, 16 bits, formats, manifest, resume)
is the same for every kind.

Tile sizes here are in input (LR) pixels, as Real-ESRGAN's `--tile` / `--tile_pad`; for FlowSR
they are converted to the output pixels that `flowsr.sample` works in. A weights file's native
scale is read from the file; another `scale` resizes the model's output (bicubic, antialiased),
as Real-ESRGAN's `--outscale` does (with Lanczos there).
"""
from __future__ import annotations

import functools
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.fs as pafs
import torch

from pipeline.storage import is_local, resolve_fs

from pipeline.row_resize import RowResizer

from flowsr.tiling import TileBlender, output_size, tile_shape, tile_starts
from flowsr.upscaler import LUMA_WEIGHTS, TileUpscaler, Upscaler, default_device

WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
ONNX_SUFFIX = ".onnx"
FLOWSR_CONFIG = "config.json"  # what makes a folder a FlowSR checkpoint (flowsr.checkpoint.CONFIG_NAME)
FLOWSR, WEIGHTS, ONNX = "flowsr", "weights", "onnx"  # the kinds of model
TORCH, ONNXRUNTIME = "torch", "onnxruntime"
BACKENDS = (TORCH, ONNXRUNTIME)  # what runs the network
DEFAULT_FLOWSR_SCALE = 4.0  # a FlowSR checkpoint runs at any scale; this one unless told
RUNNABLE_PURPOSES = ("SR", "Restoration")  # image -> image models (Restoration: scale 1)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(ValueError):
    """A model argument that names no model these jobs can run; the message is one line."""


@dataclass(frozen=True)
class ModelInfo:
    uri: str
    kind: str  # FLOWSR | WEIGHTS | ONNX
    native_scale: Optional[int]  # None: any scale (FlowSR)
    name: str  # e.g. "FlowSR", "ESRGAN (64nf, 23nb, SR x4)"
    tiling: str = "supported"  # spandrel's hint: supported | discouraged | internal (the model tiles itself)

    def scale(self, requested: Optional[float] = None) -> float:
        """The output / input size a job uses: `requested`, else the native scale."""
        return float(requested or self.native_scale or DEFAULT_FLOWSR_SCALE)


# ---- which kind of model -----------------------------------------------------------------------
def model_kind(uri: str) -> str:
    """FLOWSR for a folder with `config.json`, WEIGHTS for a weights-file name, ONNX for an `.onnx`
    file name; else ModelError."""
    ext = os.path.splitext(uri.rstrip("/"))[1].lower()
    if ext in WEIGHT_SUFFIXES:
        return WEIGHTS
    if ext == ONNX_SUFFIX:
        return ONNX
    fs, path = resolve_fs(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        if fs.get_file_info(f"{path.rstrip('/')}/{FLOWSR_CONFIG}").type == pafs.FileType.File:
            return FLOWSR
        raise ModelError(f"{uri} is a folder but not a FlowSR checkpoint (no {FLOWSR_CONFIG} in it)")
    if kind == pafs.FileType.File:
        raise ModelError(f"unsupported model file {uri}: give a FlowSR checkpoint folder, an SR weights file "
                         f"that spandrel reads ({', '.join(WEIGHT_SUFFIXES)}) or a FlowSR {ONNX_SUFFIX} export")
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


def is_torchscript(path: str) -> bool:
    """Is the file at `path` a TorchScript archive (`torch.jit.save`)? A zip archive holding
    `constants.pkl` or compiled `code/`, as `torch.load` tells one from a `torch.save` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        records = [name.split("/", 1)[-1] for name in archive.namelist()]
    return any(record == "constants.pkl" or record.startswith("code/") for record in records)


def read_state_dict(path: str, uri: str, device) -> dict:
    """The tensors of weights file `path` (named `uri` in messages), read as data only: a
    safetensors file, or a `torch.save` pickle through `torch.load(weights_only=True)`. A
    TorchScript archive is refused (ModelError), never loaded: `torch.jit.load`, which spandrel
    tries for `.pt` files and `torch.load` hands a TorchScript zip to, runs the archive's code
    (a scripted module's `__setstate__`)."""
    if is_torchscript(path):
        raise ModelError(f"{uri}: a TorchScript archive, which runs its own code when loaded; give the "
                         f"model's weights (a state dict: .pth, .ckpt or .safetensors) instead")
    if os.path.splitext(path)[1].lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


def load_weights(uri: str, device=None):
    """A spandrel `ImageModelDescriptor` (eval mode, on `device`) of weights file `uri` (its
    tensors read as data only, `read_state_dict`); a file spandrel cannot read, a TorchScript
    archive, or a model that is not image -> image, is a one-line ModelError."""
    import spandrel

    path = local_weights(uri)
    device = torch.device(device or "cpu")
    try:
        # read on the host (small files), then the model goes to `device`: safetensors cannot read onto every device (meta)
        state = spandrel.canonicalize_state_dict(read_state_dict(path, uri, "cpu"))
        model = spandrel.ModelLoader(device=device).load_from_state_dict(state)
    except ModelError:
        raise
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
    """What `uri` is and its native scale (a weights file is loaded on the CPU to read it, an ONNX
    file's metadata is read)."""
    kind = model_kind(uri)
    if kind == FLOWSR:
        return ModelInfo(uri, FLOWSR, None, "FlowSR")
    if kind == ONNX:
        from flowsr.export import ExportError, read_contract

        try:
            contract = read_contract(local_weights(uri))
        except ExportError as err:
            raise ModelError(str(err)) from None
        except Exception as err:  # noqa: BLE001 — not an ONNX file at all
            raise ModelError(f"{uri}: not a readable ONNX file ({type(err).__name__})") from None
        return ModelInfo(uri, ONNX, None, f"FlowSR one-step ONNX ({contract.get('dtype', 'fp32')}, size multiple "
                                          f"{contract['size_multiple']}; onnxruntime)")
    return _describe_weights(uri, load_weights(uri))


def backend_for(uri: str, requested: Optional[str] = None) -> str:
    """The backend that runs model `uri`: onnxruntime for an `.onnx` export, torch otherwise;
    a `requested` backend that cannot run it is a one-line ModelError."""
    if requested is not None and requested not in BACKENDS:
        raise ModelError(f"unknown backend: {requested!r} (choose from {', '.join(BACKENDS)})")
    backend = ONNXRUNTIME if model_kind(uri) == ONNX else TORCH
    if requested == ONNXRUNTIME and backend != ONNXRUNTIME:
        raise ModelError(f"backend onnxruntime runs a FlowSR {ONNX_SUFFIX} export, not {uri}: export it with "
                         f"`flowsr export CKPT OUT{ONNX_SUFFIX}` and pass -m OUT{ONNX_SUFFIX}")
    if requested == TORCH and backend != TORCH:
        raise ModelError(f"{uri} is an ONNX export: run it with --backend onnxruntime (or give the checkpoint "
                         "for the torch backend)")
    return backend


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


def _pad_index(n: int, pad: int) -> np.ndarray:
    """The source index of each of the `n + pad` positions of a length-`n` axis padded by `pad` at
    its end: reflected as far as it goes, then the last reflected position repeated (Real-ESRGAN's
    --pre_pad; spandrel pads to its size requirements the same way)."""
    index = np.arange(n + pad)
    reflect = min(pad, n - 1)
    index[n:n + reflect] = 2 * (n - 1) - index[n:n + reflect]
    index[n + reflect:] = n - 1 - reflect
    return index


class WeightsUpscaler(TileUpscaler):
    """A spandrel model behind the `flowsr.upscaler.TileUpscaler` batch contract. Runs with or without Ray.

    `upscale_images` maps HxWxC uint8 / uint16 arrays (C = 1 or 3) to SR arrays of the same
    dtype and channel count at `output_size(h, w, scale)`. Images of equal size run as one
    batch; each is cut into `tile` x `tile` input-pixel tiles overlapping by `tile_overlap`,
    `tile_batch` tiles per forward, and streamed as `flowsr.upscaler.Upscaler` streams: tile outputs
    are blended with Gaussian weights (`flowsr.tiling.TileBlender`) into a band of rows, and rows
    go into the output array as soon as no later tile touches them (resized on the way for a
    scale other than the native one, `RowResizer`). Peak memory: O(tile^2 x tile_batch) for the
    network, O(tile x scale x output width) per image for the bands, plus the input and the one
    output array; no image-sized float buffer. `tile=None` runs whole images, as does a model
    that spandrel marks as tiling internally (its memory is then the model's). Tiles are rounded
    up to the model's size requirements. The model sees exactly what a direct spandrel call sees
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

    def _run(self, tiles: torch.Tensor) -> torch.Tensor:
        tiles = tiles.to(self.device, self.dtype)
        if self.device.type == "cuda":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        return self.model(tiles).float()

    @torch.no_grad()
    def upscale_stream(self, crop: Callable[[int, np.ndarray, np.ndarray], torch.Tensor], count: int,
                       size: Tuple[int, int], emit: Callable[[int, int, torch.Tensor], None],
                       out_size: Optional[Tuple[int, int]] = None) -> None:
        """Upscale `count` images of input size `size` = (h, w) to `out_size` (default
        `output_size(h, w, scale)`), handing each image k's result to `emit(k, top, rows)` in bands
        of final rows, top to bottom (rows: (C', n, W) float32 in [0, 1], C' the model's output
        channels). `crop(k, rows, cols)` gives image k's pixels at the index arrays `rows`, `cols`
        as (C, len(rows), len(cols)) float in [0, 1] in the model's input channels.

        The image padded by `pre_pad` (reflected) is cut into tiles (see the class); with one tile
        per image the model's output goes straight on. At the native scale rows are the blend as
        it is; another scale resizes them on the way (`RowResizer`), which equals resizing the
        whole native result with `F.interpolate(mode="bicubic", antialias=True)` in float64 within
        1e-6 (so an output level differs only where a value lies on a rounding boundary)."""
        h, w = size
        s = self.model.scale
        native = (h * s, w * s)
        out_size = tuple(out_size or output_size(h, w, self.scale))
        rows_of, cols_of = _pad_index(h, self.pre_pad), _pad_index(w, self.pre_pad)
        hp, wp = len(rows_of), len(cols_of)
        T = self.tile or max(hp, wp)
        th, tw = tile_shape(hp, wp, T)  # a budget of T x T pixels: longer tiles along a thin image
        ys = tile_starts(hp, th, min(self.tile_overlap, th - 1))
        xs = tile_starts(wp, tw, min(self.tile_overlap, tw - 1))
        sinks = [functools.partial(emit, k) if out_size == native else
                 RowResizer(native, out_size, functools.partial(emit, k), self.device).add for k in range(count)]
        boxes = [(r, k, x) for r in range(len(ys)) for k in range(count) for x in xs]
        if len(ys) == len(xs) == 1:  # one tile per image: no blend
            bands = [_Crop(native, sink) for sink in sinks]
        else:
            blender = TileBlender([y * s for y in ys], [x * s for x in xs], th * s, tw * s, wp * s, device=self.device)
            bands = [blender.band(native, sink) for sink in sinks]
        for i in range(0, len(boxes), self.tile_batch):
            chunk = boxes[i:i + self.tile_batch]
            tiles = torch.stack([crop(k, rows_of[ys[r]:ys[r] + th], cols_of[x:x + tw]) for r, k, x in chunk])
            for (r, k, x), t in zip(chunk, self._run(tiles)):
                bands[k].add(r, x * s, t)

    @torch.no_grad()
    def upscale_tensor(self, x: torch.Tensor, out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B, C, h, w) float in [0, 1] (C = the model's input channels) -> (B, C', H, W) float32 in
        [0, 1], (H, W) = `out_size` or `output_size(h, w, scale)`. Streams as `upscale_images`, but
        the result is one float32 tensor: for large images use `upscale_images`."""
        h, w = x.shape[-2:]
        out_size = tuple(out_size or output_size(h, w, self.scale))
        out = torch.empty(x.shape[0], self.model.output_channels, *out_size, device=x.device)

        def crop(k, rows, cols):
            return x[k][:, torch.from_numpy(rows).to(x.device)][:, :, torch.from_numpy(cols).to(x.device)].float()

        def emit(k, top, rows):
            out[k, :, top:top + rows.shape[1]] = rows.to(out.device)
        self.upscale_stream(crop, x.shape[0], (h, w), emit, out_size)
        return out

    def bucket_key(self, image: np.ndarray) -> Tuple[int, int]:
        """Images with equal keys share one batch: equal input sizes (no padding, so a batched image
        gets exactly what it would get alone)."""
        return int(image.shape[0]), int(image.shape[1])

    def upscale_images(self, images: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[float]]:
        """SR arrays (same dtype and channels as the inputs) and seconds per image (`TileUpscaler`)."""
        for image in images:
            if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in (1, 3):
                raise ValueError(f"expected uint8/uint16 HxWx1 or HxWx3, got {image.dtype} {image.shape}")
        return super().upscale_images(images)

    def _upscale_group(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Images of one input size, streamed (`upscale_stream`) straight into their output arrays."""
        h, w = images[0].shape[:2]
        H, W = output_size(h, w, self.scale)
        out = [np.empty((H, W, image.shape[2]), image.dtype) for image in images]

        def crop(k, rows, cols):
            return to_unit(images[k][np.ix_(rows, cols)], self.device, self.model.input_channels)

        def emit(k, top, rows):
            out[k][top:top + rows.shape[1]] = from_unit(rows, images[k].dtype, images[k].shape[2])
        self.upscale_stream(crop, len(images), (h, w), emit)
        return out


class _Crop:
    """The one-tile case of `TileBlender`'s bands: a tile's output, cropped to `size`, goes straight on."""

    def __init__(self, size: Tuple[int, int], emit):
        self.size, self.emit = size, emit

    def add(self, r: int, x: int, tile: torch.Tensor) -> None:
        self.emit(0, tile[:, :self.size[0], :self.size[1]])


# ---- pixels <-> the [0, 1] tensors a spandrel model takes ---------------------------------------------
def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) -> (`channels`, H, W): gray repeated to RGB, RGB reduced to luma (ITU-R 601)."""
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1)
    return (x * torch.tensor(LUMA_WEIGHTS, device=x.device)[:, None, None]).sum(0, keepdim=True)


def to_unit(image: np.ndarray, device, channels: int) -> torch.Tensor:
    """HxWxC uint8 / uint16 -> (`channels`, H, W) float32 in [0, 1] (value / peak) on `device`."""
    peak = np.iinfo(image.dtype).max
    array = np.ascontiguousarray(image)
    array = array if array.flags.writeable else array.copy()
    return _match_channels(torch.from_numpy(array).to(device).permute(2, 0, 1).float() / peak, channels)


def from_unit(y: torch.Tensor, dtype, channels: int) -> np.ndarray:
    """(C, H, W) in [0, 1] -> HxW x `channels` `dtype`, rounded (`to_unit`'s inverse)."""
    peak = np.iinfo(dtype).max
    y = _match_channels(y, channels)
    return (y.float() * peak).round().clamp(0, peak).permute(1, 2, 0).cpu().numpy().astype(dtype)


# ---- the seam ---------------------------------------------------------------------------------------
def _output_pixels(pixels: Optional[int], scale: float) -> Optional[int]:
    return round(pixels * scale) if pixels else pixels


def load_upscaler(model: str, *, scale: Optional[float] = None, tile: Optional[int] = None,
                  tile_overlap: int = 16, tile_batch: int = 16, pre_pad: int = 0, device=None,
                  dtype: Optional[str] = None, compile: bool = False, compile_cache_dir: Optional[str] = None,
                  bucket: int = 64, steps: int = 1, vae_tile: Optional[int] = 512, color_fix: str = "wavelet",
                  pretrained: Optional[str] = None, weights: str = "student", backend: Optional[str] = None):
    """The upscaler of `model` (a FlowSR checkpoint, a spandrel weights file or a FlowSR ONNX
    export), loaded once.

    `tile` / `tile_overlap` / `pre_pad` are in input pixels. The FlowSR-only options (`bucket`
    and `vae_tile` in output pixels, `steps`, `color_fix`, `pretrained`, `weights`) do not apply
    to a weights file, which runs as spandrel runs it. An ONNX export (`backend` onnxruntime)
    runs one step at the dtype it was exported in, whole tiles (no `vae_tile`).
    """
    common = dict(tile_batch=tile_batch, device=device, dtype=dtype, compile=compile,
                  compile_cache_dir=compile_cache_dir)
    kind = model_kind(model)
    backend_for(model, backend)
    if kind == WEIGHTS:
        return WeightsUpscaler(model, scale=scale, tile=tile, tile_overlap=tile_overlap, pre_pad=pre_pad, **common)
    if pre_pad:
        raise ModelError("pre_pad applies to weights files; a FlowSR checkpoint pads its input itself")
    scale = float(scale or DEFAULT_FLOWSR_SCALE)
    if kind == ONNX:
        return _onnx_upscaler(model, scale=scale, tile=_output_pixels(tile, scale),
                              tile_overlap=_output_pixels(tile_overlap, scale), bucket=bucket, steps=steps,
                              color_fix=color_fix, tile_batch=tile_batch, device=device, dtype=dtype, compile=compile)
    return Upscaler(model, scale=scale, tile=_output_pixels(tile, scale),
                    tile_overlap=_output_pixels(tile_overlap, scale), vae_tile=vae_tile, bucket=bucket,
                    steps=steps, color_fix=color_fix, pretrained=pretrained, weights=weights, **common)



def check_onnx_options(steps: int = 1, dtype: Optional[str] = None, compile: bool = False) -> None:
    """An ONNX export runs one step at its own dtype, without torch.compile; else ModelError."""
    if steps != 1:
        raise ModelError(f"an ONNX export runs one step; got steps={steps} (use the checkpoint for more)")
    if dtype or compile:
        raise ModelError("an ONNX export runs at the dtype it was exported in (`flowsr export --dtype`), "
                         "without torch.compile: leave --dtype and --compile unset")


def _onnx_upscaler(model: str, *, steps: int, dtype: Optional[str], compile: bool, **options):
    from pipeline.onnx_models import OnnxUpscaler

    check_onnx_options(steps, dtype, compile)
    return OnnxUpscaler(local_weights(model), **options)
