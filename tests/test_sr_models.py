"""Models users already have: spandrel weights files (Real-ESRGAN RRDBNet, SwinIR, Compact) through
the same seam, upscale job and evaluate job as FlowSR checkpoints; Real-ESRGAN's CLI spellings."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowsr import tiling as T

from flowsr import upscaler as U
from pipeline import sr_models as M
from pipeline import image_codecs, naming, row_resize


# ---- weights files with the upstream key names, random init ---------------------------------------
def _basicsr_rrdbnet():
    """BasicSR's RRDBNet: the class Real-ESRGAN trains and saves (upstream key names)."""
    import torchvision.transforms.functional as tvf

    sys.modules.setdefault("torchvision.transforms.functional_tensor", tvf)  # basicsr 1.4.2 vs new torchvision
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    """(path, module): a small Real-ESRGAN x4plus-architecture RRDBNet (2 blocks, 16 features;
    spandrel reads the growth channels as 32), saved as Real-ESRGAN releases it: {"params_ema": ...}.
    Its last bias is 0.5 so that outputs lie inside [0, 1] instead of clamped at 0."""
    torch.manual_seed(0)
    net = _basicsr_rrdbnet()(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=32, scale=4).eval()
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
    path = tmp_path_factory.mktemp("esrgan") / "RealESRGAN_x4plus_small.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    return str(path), net


@pytest.fixture(scope="module")
def swinir(tmp_path_factory):
    """(path, module): a small x2 SwinIR (upstream key names: spandrel's copy of the SwinIR class)."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(1)
    net = SwinIR(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0, upscale=2,
                 upsampler="pixelshuffledirect", img_range=1.0).eval()
    path = tmp_path_factory.mktemp("swinir") / "swinir_x2_small.pth"
    torch.save(net.state_dict(), path)
    return str(path), net


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """A realesr-general-x4v3-architecture net (SRVGGNetCompact) with a 4-pixel receptive radius."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(2)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu").eval()
    path = tmp_path_factory.mktemp("compact") / "compact_x4.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def nearest(tmp_path_factory):
    """A Compact x4 net with its residual zeroed: exactly nearest-neighbour upscaling."""
    from spandrel.architectures.Compact import Compact

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=4, act_type="prelu").eval()
    with torch.no_grad():
        net.body[-1].weight.zero_(), net.body[-1].bias.zero_()
    path = tmp_path_factory.mktemp("nearest") / "nearest_x4.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def _rgb(h, w, seed=0):
    """A smooth uint8 RGB image with a disc and some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 4) ** 2] = (230, 40, 60)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _unit(image):
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / np.iinfo(image.dtype).max


# ---- the seam -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, arch, native, tiling", [("esrgan", "ESRGAN", 4, "supported"),
                                                         ("swinir", "SwinIR", 2, "discouraged")])
def test_weights_files_load_through_the_seam_and_match_direct_calls(request, which, arch, native, tiling):
    import spandrel

    path, net = request.getfixturevalue(which)
    info = M.describe(path)
    assert (info.kind, info.native_scale, info.scale()) == (M.WEIGHTS, native, float(native))
    assert info.name.startswith(arch) and info.tiling == tiling
    assert M.describe(f"file://{path}") == dataclasses.replace(info, uri=f"file://{path}")
    image = _rgb(20, 24)
    x = _unit(image)
    direct = spandrel.ModelLoader().load_from_file(path)(x)  # what spandrel gives, no job around it
    with torch.no_grad():
        upstream = net(x).clamp(0, 1)  # the module the file was saved from
    assert direct.shape == (1, 3, 20 * native, 24 * native)
    for tile in (0, 32):  # untiled, and a tile the image fits in
        up = M.load_upscaler(path, tile=tile, tile_overlap=8, device="cpu")
        assert isinstance(up, M.WeightsUpscaler) and up.scale == native
        out = up.upscale_tensor(x)
        assert (out - direct).abs().max() < 1e-6
        assert (out - upstream).abs().max() < 1e-6
        (arr,), seconds = up.upscale_images([image])
        assert arr.dtype == np.uint8 and arr.shape == (20 * native, 24 * native, 3) and seconds[0] > 0
        expected = (direct[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(arr.astype(float) - expected).max() <= 1  # float rounding at .5 only
        assert (arr.astype(float) != expected).mean() < 1e-3


class Recording:
    """A spandrel model that records the shape of every batch of tiles it is called on."""

    def __init__(self, model):
        self.inner, self.shapes = model, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, tiles):
        self.shapes.append(tuple(tiles.shape))
        return self.inner(tiles)


def test_tiles_and_overlap_are_in_input_pixels(compact):
    """Tiles of 16 input pixels overlapping by 10 for a net with a 4-pixel receptive radius: where
    a tile lacks context, a neighbour that has it outweighs it in the Gaussian blend, so tiled ~
    untiled (within half a uint8 level); an overlap read as output pixels (10 / 4) leaves seams."""
    image = _rgb(40, 36, seed=3)
    untiled = M.load_upscaler(compact, tile=0, device="cpu")
    tiled = M.load_upscaler(compact, tile=16, tile_overlap=10, device="cpu")
    tiled.model = Recording(tiled.model)
    x = _unit(image)
    out = tiled.upscale_tensor(x)
    shapes = tiled.model.shapes
    n_tiles = len(T.tile_starts(40, 16, 10)) * len(T.tile_starts(36, 16, 10))
    assert sum(s[0] for s in shapes) == n_tiles and {s[1:] for s in shapes} == {(3, 16, 16)}
    reference = untiled.upscale_tensor(x)
    assert out.shape == reference.shape == (1, 3, 160, 144)
    assert (out - reference).abs().max() < 2e-3 and (out - reference).abs().mean() < 3e-5
    thin = M.load_upscaler(compact, tile=16, tile_overlap=2, device="cpu").upscale_tensor(x)
    assert (thin - reference).abs().max() > 1e-2  # what too little overlap looks like: this test can fail


def test_other_scale_resizes_the_native_output_like_pil(esrgan, swinir):
    path, _ = esrgan
    image = _rgb(20, 24)
    native = M.load_upscaler(path, device="cpu").upscale_tensor(_unit(image))
    half = M.load_upscaler(path, scale=2, device="cpu")
    out = half.upscale_tensor(_unit(image))
    assert out.shape == (1, 3, 40, 48)
    pil = np.stack([np.asarray(Image.fromarray(c.numpy(), mode="F").resize((48, 40), Image.BICUBIC))
                    for c in native[0]])  # PIL's antialiased bicubic downscale, per channel
    assert np.abs(out[0].numpy() - np.clip(pil, 0, 1)).max() < 2e-3
    (odd,), _ = M.load_upscaler(swinir[0], scale=3, device="cpu").upscale_images([image[:15, :17]])
    assert odd.shape == (45, 51, 3)  # output_size: rounded half up, as for FlowSR
    assert M.load_upscaler(swinir[0], tile=10, tile_overlap=4, device="cpu").tile == 16  # spandrel: minimum 16


def test_dtypes_channels_and_batches(esrgan):
    path, _ = esrgan
    up = M.load_upscaler(path, tile=16, tile_overlap=4, device="cpu")
    rgb, rgb2, small = _rgb(20, 24), _rgb(20, 24, seed=5), _rgb(12, 10, seed=6)
    gray16 = (_rgb(20, 24, seed=7)[..., :1].astype(np.uint16) * 257)
    outs, seconds = up.upscale_images([rgb, small, gray16, rgb2])
    assert [o.shape for o in outs] == [(80, 96, 3), (48, 40, 3), (80, 96, 1), (80, 96, 3)]
    assert [o.dtype for o in outs] == [np.uint8, np.uint8, np.uint16, np.uint8] and all(s > 0 for s in seconds)
    alone = [up.upscale_images([im])[0][0] for im in (rgb, small, gray16, rgb2)]
    for batched, single in zip(outs, alone):  # equal-size batches: no padding, so identical to alone
        assert np.array_equal(batched, single)
    # gray: the RGB model sees the gray image repeated; the output is its ITU-R 601 luma, 16 bits
    rgb_of_gray = up.upscale_tensor(_unit(gray16).expand(-1, 3, -1, -1))[0]
    luma = (rgb_of_gray * torch.tensor(U.LUMA_WEIGHTS)[:, None, None]).sum(0).numpy() * 65535
    assert np.abs(outs[2][..., 0] - luma).max() <= 0.51


def test_pre_pad_reflects_and_crops(esrgan):
    path, _ = esrgan
    image = _rgb(20, 24)
    out = M.load_upscaler(path, pre_pad=5, device="cpu").upscale_tensor(_unit(image))
    padded = F.pad(_unit(image), (0, 5, 0, 5), mode="reflect")
    reference = M.load_upscaler(path, device="cpu").upscale_tensor(padded)[..., :80, :96]
    assert out.shape == (1, 3, 80, 96) and (out - reference).abs().max() < 1e-6


# ---- streaming: bounded memory, the same pixels ----------------------------------------------------------
def _old_whole_image(path, image, scale, tile, overlap, pre_pad=0):
    """What upscaling did before it streamed, computed here from spandrel and torch alone: the whole
    image in float, tiles blended over the whole output (`tiled_apply`), cropped, resized with
    `F.interpolate(bicubic, antialias)` for another scale; then rounded to the image's dtype."""
    import spandrel

    model = spandrel.ModelLoader().load_from_file(path).eval()
    peak = np.iinfo(image.dtype).max
    h, w, c = image.shape
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / peak
    x = x.expand(-1, 3, -1, -1)
    rows = [min(r, 2 * (h - 1) - r) if r < h + min(pre_pad, h - 1) else h - 1 - min(pre_pad, h - 1)
            for r in range(h + pre_pad)]  # reflect, then repeat
    cols = [min(r, 2 * (w - 1) - r) if r < w + min(pre_pad, w - 1) else w - 1 - min(pre_pad, w - 1)
            for r in range(w + pre_pad)]
    x = x[:, :, rows][:, :, :, cols]
    s = model.scale
    with torch.no_grad():
        y = T.tiled_apply(lambda t, boxes: model(t), x, tile, overlap, unit_out=s)[..., :h * s, :w * s]
    size = T.output_size(h, w, scale or s)
    if size != (h * s, w * s):
        y = F.interpolate(y, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if c == 1:
        y = (y * torch.tensor(U.LUMA_WEIGHTS)[:, None, None]).sum(1, keepdim=True)
    return y[0].permute(1, 2, 0).numpy() * peak


@pytest.mark.parametrize("scale, dtype, channels", [(None, np.uint8, 3), (None, np.uint16, 1), (3, np.uint16, 1),
                                                    (3, np.uint8, 3), (5.5, np.uint8, 1), (5.5, np.uint16, 3)])
def test_streamed_bands_equal_the_whole_image_result(compact, scale, dtype, channels):
    """Tiles of 16 input pixels (overlap 6, 3 tiles per forward) on a 37 x 45 image streamed in
    bands, at the native x4, a smaller (x3) and a larger (x5.5) scale, equal the whole-image blend
    and resize within one level (float32 rounding; F.interpolate places its taps in float32)."""
    rgb = _rgb(37, 45, seed=11).astype(np.float64) / 255
    image = (rgb if channels == 3 else rgb[..., 1:2]) * np.iinfo(dtype).max
    image = image.round().astype(dtype)
    up = M.load_upscaler(compact, scale=scale, tile=16, tile_overlap=6, tile_batch=3, device="cpu")
    (out,), _ = up.upscale_images([image])
    reference = _old_whole_image(compact, image, scale, 16, 6)
    assert out.shape == reference.shape and out.dtype == dtype
    assert np.abs(out - reference).max() <= 1  # within one level of the unrounded reference
    rounded_apart = np.abs(out - reference.round()) > 0
    assert rounded_apart.mean() < (0.06 if dtype == np.uint16 else 2e-3)
    if scale:  # the float values, before rounding: the bound the resize states
        x = _unit(image).expand(-1, 3, -1, -1)
        streamed = up.upscale_tensor(x)[0]
        whole = M.load_upscaler(compact, tile=16, tile_overlap=6, device="cpu").upscale_tensor(x)
        whole = F.interpolate(whole.double(), size=streamed.shape[-2:], mode="bicubic", antialias=True)
        assert (streamed - whole.clamp(0, 1)[0]).abs().max() < 1e-6


def test_row_resizer_is_the_whole_image_resize_at_any_width():
    """Bands of 5 rows resized from 6000 to 8000 and 4500 columns equal `F.interpolate` (bicubic,
    antialiased) of the whole float64 image within 1e-6 (float32 `F.interpolate` is ~3e-4 off here)."""
    x = torch.rand(1, 2, 23, 6000, generator=torch.Generator().manual_seed(0))
    for size in ((31, 8000), (17, 4500)):
        bands = []
        resizer = row_resize.RowResizer((23, 6000), size, lambda top, rows: bands.append((top, rows)))
        for top in range(0, 23, 5):
            resizer.add(top, x[0, :, top:top + 5])
        assert [top for top, _ in bands] == list(np.cumsum([0] + [r.shape[1] for _, r in bands])[:-1])
        out = torch.cat([rows for _, rows in bands], 1)
        whole = F.interpolate(x.double(), size=size, mode="bicubic", antialias=True).clamp(0, 1)[0]
        assert out.shape == whole.shape and (out - whole).abs().max() < 1e-6
    with pytest.raises(ValueError, match="in order"):
        row_resize.RowResizer((23, 60), (30, 80), print).add(5, x[0, :, 5:10, :60])


@pytest.mark.parametrize("size, tile, pre_pad, scale", [((37, 45), 0, 0, 3), ((37, 45), 64, 0, None),
                                                        ((37, 45), 64, 0, 2.5), ((12, 45), 16, 0, None),
                                                        ((37, 45), 16, 40, 3), ((3, 5), 0, 6, None)])
def test_one_tile_whole_images_and_pre_pad_stream_too(compact, size, tile, pre_pad, scale):
    """`tile=0` (whole images), an image smaller than a tile, one row of tiles, and a pre_pad longer
    than the image (reflected, then the last reflected row repeated) give the whole-image result."""
    image = _rgb(*size, seed=12)
    up = M.load_upscaler(compact, scale=scale, tile=tile, tile_overlap=6, pre_pad=pre_pad, device="cpu")
    (out,), _ = up.upscale_images([image])
    reference = _old_whole_image(compact, image, scale, tile or None, 6, pre_pad)
    assert out.shape == reference.shape
    assert np.abs(out - reference).max() <= 1 and (np.abs(out - reference.round()) > 0).mean() < 2e-3


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor any torch operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("scale, dtype, channels", [(None, np.uint8, 3), (3, np.uint16, 1), (5, np.uint8, 3)])
def test_no_tensor_is_image_sized(compact, scale, dtype, channels):
    """The memory bound: upscaling a 96 x 96 image at x4 (native), x3 and x5 in tiles of 16 input
    pixels, 2 tiles per forward, no torch tensor (input, blend, weights, resize or output conversion)
    holds more than two tile heights of rows (O(tile x width)); the whole native result is six."""
    image = _rgb(96, 96, seed=13)[..., :channels].astype(dtype)
    up = M.load_upscaler(compact, scale=scale, tile=16, tile_overlap=4, tile_batch=2, device="cpu")
    with LargestTensor() as seen:
        (out,), _ = up.upscale_images([image])
    H, W = out.shape[:2]
    assert (H, W) == T.output_size(96, 96, scale or 4)
    native = 96 * 4
    band = 3 * 2 * 16 * 4 * max(W, native)  # RGB x 2 tile heights of rows x the wider of the widths
    assert seen.largest <= band < 3 * native * native / 2


@pytest.fixture(scope="module")
def flowsr_ckpt(tmp_path_factory):
    """A FlowSR inference checkpoint of the small pixel-space backbone (random init)."""
    from flowsr.backbones import PixelBackbone
    from flowsr.config import apply_overrides, preset

    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]"])
    ckpt = tmp_path_factory.mktemp("flowsr_ckpt")
    cfg.save(str(ckpt / "config.json"))
    torch.manual_seed(3)
    PixelBackbone.from_config(cfg.model).save_trainable(str(ckpt / "student"))
    return str(ckpt)


def test_flowsr_checkpoints_take_tiles_in_input_pixels(flowsr_ckpt):
    ckpt = flowsr_ckpt
    assert M.describe(str(ckpt)).kind == M.FLOWSR and M.describe(str(ckpt)).scale() == 4.0
    up = M.load_upscaler(str(ckpt), scale=2, tile=32, tile_overlap=10, device="cpu")
    assert isinstance(up, U.Upscaler)
    assert (up.options["tile"], up.options["tile_overlap"], up.options["scale"]) == (64, 20, 2)
    with pytest.raises(M.ModelError, match="pre_pad"):
        M.load_upscaler(str(ckpt), pre_pad=4)


def test_unsupported_models_are_one_clear_line(tmp_path, swinir):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "model.tflite").write_bytes(b"tflite")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "unknown.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "folder").mkdir()
    cases = {"model.onnx": "not a readable ONNX file", "model.tflite": "unsupported model file",
             "unknown.pth": "not an architecture spandrel knows",
             "garbage.safetensors": "spandrel cannot load it", "folder": "not a FlowSR checkpoint",
             "missing.pth": "no weights file", "missing": "no model at"}
    for name, message in cases.items():
        with pytest.raises(M.ModelError, match=message) as err:
            M.describe(str(tmp_path / name))
        assert "\n" not in str(err.value)
    with pytest.raises(M.ModelError, match="does not support fp16"):
        M.load_upscaler(swinir[0], dtype="fp16", device="cpu")  # spandrel: SwinIR has no fp16


def test_cli_unsupported_model_exits_2_with_one_line(tmp_path, capsys):
    from jobs.cli import main

    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "unknown.pth")
    (tmp_path / "in").mkdir()
    assert main(["upscale", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                 "-m", str(tmp_path / "unknown.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown.pth" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


# ---- Real-ESRGAN's spellings ------------------------------------------------------------------------------
def _parse(argv):
    from jobs.cli import build_parser
    from jobs.upscale import config_from_args

    return config_from_args(build_parser().parse_args(["upscale", *argv]))


def test_realesrgan_spellings_mean_what_they_mean_there(tmp_path):
    cfg = _parse(["-i", "in", "-o", "out", "--model_path", "m.pth", "--outscale", "3.5", "--tile", "200",
                  "--tile_pad", "10", "--pre_pad", "4", "--ext", "auto", "--suffix", "out", "--fp32",
                  "--alpha_upsampler", "bicubic"])
    assert (cfg.input, cfg.output, cfg.checkpoint, cfg.scale) == ("in", "out", "m.pth", 3.5)
    assert (cfg.tile, cfg.tile_overlap, cfg.pre_pad, cfg.format, cfg.dtype) == (200, 10, 4, "same", "fp32")
    assert cfg.name_suffix == "_out"
    rows = naming.plan_outputs([("in/img.png", "img.png"), ("in/a/b.jpg", "a/b.jpg")], "out", cfg.format,
                               cfg.name_suffix)
    assert [r["output"] for r in rows] == [os.path.join("out", "img_out.png"), os.path.join("out", "a/b_out.jpg")]
    opts = cfg.upscaler_options()
    assert (opts["tile"], opts["tile_overlap"], opts["pre_pad"]) == (200, 10, 4)  # input pixels, to the seam
    old = _parse(["in", "out", "--checkpoint", "ckpt", "-s", "2"])  # the spellings existing users have
    assert (old.input, old.output, old.checkpoint, old.scale, old.name_suffix) == ("in", "out", "ckpt", 2.0, "")
    for bad, message in ((["-o", "out", "-m", "m.pth"], "give the input"),
                         (["a", "-i", "b", "-o", "out", "-m", "m.pth"], "two inputs"),
                         (["-i", "in", "-o", "out", "-m", "m.pth", "--alpha_upsampler", "realesrgan"], "bicubic"),
                         (["-i", "in", "-o", "out", "-m", "m.pth", "--tile", "8", "--tile_pad", "8"], "tile >")):
        with pytest.raises(ValueError, match=message):
            _parse(bad)


# ---- the jobs ----------------------------------------------------------------------------------------------
def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.dtype == np.uint16:
        import cv2

        cv2.imwrite(str(path), array[..., ::-1] if array.ndim == 3 else array)
    else:
        Image.fromarray(array).save(path)


def test_upscale_job_runs_a_realesrgan_file(ray_local, esrgan, tmp_path):
    """`flowsr upscale -i -o -m x.pth` with Real-ESRGAN's options: native x4, suffix with `_`,
    alpha, 16 bits, a corrupt file recorded, PNG output equal to a direct spandrel call; resumes."""
    import cv2
    import spandrel

    from jobs.cli import main

    path, _ = esrgan
    src = tmp_path / "in"
    images = {"a.png": _rgb(20, 24), "b.jpg": _rgb(16, 16, seed=1), "c.png": np.dstack([_rgb(12, 10, 2),
              np.full((12, 10), 128, np.uint8)]), "d.png": _rgb(10, 14, 3).astype(np.uint16) * 257}
    for name, array in images.items():
        _save(src / name, array)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    argv = ["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "-m", path, "--suffix", "out", "--ext", "auto",
            "-t", "32", "--tile_pad", "8", "--batch-size", "2", "--allow-errors"]  # broken.png fails: exit 0 only so
    assert main(argv) == 0
    rows = {os.path.basename(r["input"]): r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert rows["broken.png"]["status"] == "error"
    expected = {"a.png": ("a_out.png", (80, 96)), "b.jpg": ("b_out.jpg", (64, 64)), "c.png": ("c_out.png", (48, 40)),
                "d.png": ("d_out.png", (40, 56))}
    for name, (out_name, size) in expected.items():
        assert rows[name]["status"] == "ok" and rows[name]["output"] == str(tmp_path / "out" / out_name)
        assert image_codecs.is_valid_output(rows[name]["output"], size)
    direct = spandrel.ModelLoader().load_from_file(path)(_unit(images["a.png"]))
    written = np.asarray(Image.open(tmp_path / "out" / "a_out.png")).astype(float)
    expected_a = (direct[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(written - expected_a).max() <= 1 and (written != expected_a).mean() < 1e-3
    with Image.open(tmp_path / "out" / "c_out.png") as im:
        assert im.mode == "RGBA"
    assert cv2.imread(str(tmp_path / "out" / "d_out.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert main(argv) == 0  # a rerun finds every output done
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["error"] + ["skipped"] * 4


def test_evaluate_with_baselines_on_paired_folders(ray_local, esrgan, swinir, nearest, flowsr_ckpt, tmp_path):
    from jobs.evaluate import main
    from pipeline.schema import decode_png

    for i in range(2):  # smooth images: bicubic wins them
        hr = _rgb(32, 32, seed=10 + i)
        _save(tmp_path / "hr" / f"img{i}.png", hr)
        _save(tmp_path / "lr" / f"img{i}.png", np.asarray(Image.fromarray(hr).resize((8, 8), Image.BICUBIC)))
    blocks = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # 4x4 blocks: nearest wins
    hr = np.kron(blocks, np.ones((4, 4, 1), np.uint8))
    hr[::5, ::3] ^= 1  # not exactly nearest (finite PSNR)
    _save(tmp_path / "hr" / "img2.png", hr)
    _save(tmp_path / "lr" / "img2.png", blocks)
    out = tmp_path / "eval"
    assert main(["--data", str(tmp_path / "hr"), "--lr-dir", str(tmp_path / "lr"), "--out", str(out),
                 "--baseline", f"RealESRGAN={esrgan[0]}", "--baseline", f"SwinIR={swinir[0]}",
                 "--baseline", nearest, "--metrics", "--checkpoint", flowsr_ckpt, "--steps", "1", "2"]) == 0
    with open(out / "table1.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["Methods"], r["#Steps"]) for r in table] == [
        ("Bicubic", "-"), ("RealESRGAN", "-"), ("SwinIR", "-"), ("nearest_x4", "-"), ("FlowSR", "1"), ("FlowSR", "2")]
    assert all(float(r["PSNR"]) > 0 and 0 < float(r["SSIM"]) <= 1 for r in table)
    with open(out / "per_image.csv") as f:
        per_image = list(csv.DictReader(f))
    assert [r["sample_id"] for r in per_image] == ["img0", "img1", "img2"]
    keys = ("bicubic", "RealESRGAN", "SwinIR", "nearest_x4", "1-step", "2-step")
    for row in per_image:
        for metric in ("psnr", "ssim"):
            scores = {k: float(row[f"{k}/{metric}"]) for k in keys}
            assert row[f"best_{metric}"] == max(scores, key=scores.get)
    assert [(r["best_psnr"], r["best_ssim"]) for r in per_image] == [("bicubic",) * 2] * 2 + [("nearest_x4",) * 2]
    lr = decode_png((tmp_path / "lr" / "img0.png").read_bytes())
    (ours,), _ = M.load_upscaler(esrgan[0], device="cpu").upscale_images([lr])
    assert np.array_equal(decode_png((out / "images" / "RealESRGAN" / "img0.png").read_bytes()), ours)
    assert decode_png((out / "images" / "SwinIR" / "img0.png").read_bytes()).shape == (32, 32, 3)  # x2 -> x4
    report = (out / "report.html").read_text()
    crops = [report.index(f'src="report/img0_{key}.png"') for key in ("lr", "bicubic", "RealESRGAN", "SwinIR",
                                                                      "1-step", "2-step", "hr")]
    assert crops == sorted(crops)  # LR / bicubic / each baseline / FlowSR 1 and N steps / HR
    markdown = (out / "table1.md").read_text()
    assert "PSNR wins" in markdown and "SSIM wins" in markdown
    with open(out / "summary.json") as f:
        wins = json.load(f)["wins"]
    for metric in ("psnr", "ssim"):
        assert sum(wins[metric].values()) == 3 and (wins[metric]["bicubic"], wins[metric]["nearest_x4"]) == (2, 1)
        assert wins[metric] == {k: sum(r[f"best_{metric}"] == k for r in per_image) for k in wins[metric]}


def test_pair_evaluator_runs_baselines_on_shard_rows(esrgan, tmp_path):
    """The Parquet-shard path (encoded `hr` / `lr` columns), one actor's work without Ray."""
    from pipeline.evaluation import EvalConfig, PairEvaluator
    from pipeline.schema import encode_png

    hr = _rgb(32, 32, seed=20)
    lr = np.asarray(Image.fromarray(hr).resize((8, 8), Image.BICUBIC))
    cfg = EvalConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "out"), baselines=(("esr", esrgan[0]),),
                     metrics=())
    out = PairEvaluator(dataclasses.asdict(cfg))({"sample_id": np.asarray(["s0"]), "hr": [encode_png(hr)],
                                                 "lr": [encode_png(lr)]})
    assert set(out) == {"sample_id", "error", "bicubic/psnr", "bicubic/ssim", "esr/psnr", "esr/ssim"}
    assert list(out["error"]) == [""]  # the pair was scored
    (sr,), _ = M.load_upscaler(esrgan[0], device="cpu").upscale_images([lr])
    saved = np.asarray(Image.open(tmp_path / "out" / "images" / "esr" / "s0.png"))
    assert np.array_equal(saved, sr) and np.isfinite(out["esr/psnr"][0]) and 0 < out["esr/ssim"][0] < 1
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(data="x", out="y", baselines=(("a", "m.pth"), ("a", "n.pth")))
    with pytest.raises(ValueError, match="folder names"):
        EvalConfig(data="x", out="y", baselines=(("../a", "m.pth"),))
