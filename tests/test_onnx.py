"""ONNX export of the one-step model and the onnxruntime backend of the upscale job."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from flowsr import export as E  # noqa: E402
from flowsr.api import FlowSRUpscaler  # noqa: E402
from flowsr.backbones import PixelBackbone, build_backbone  # noqa: E402
from flowsr.config import apply_overrides, preset  # noqa: E402
from flowsr.upscaler import Upscaler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEVEL = 1  # max difference in 8-bit levels between the backends


def _save_checkpoint(directory, cfg, backbone) -> str:
    os.makedirs(directory, exist_ok=True)
    cfg.save(os.path.join(directory, "config.json"))
    backbone.save_trainable(os.path.join(directory, "student"))
    return str(directory)


def _rgb(h, w, seed=0):
    """A smooth uint8 RGB image with a disc and some noise (texture for the network to act on)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 4) ** 2] = (230, 40, 60 + seed)
    img += np.random.default_rng(seed).normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8)


# ---- fixtures: a pixel-small and a tiny SD checkpoint, each exported once ------------------------
PIXEL_CHANNELS = [8, 16, 16]  # two down-samplings: size multiple 4


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    cfg = apply_overrides(preset("pixel-small"), [f"model.pixel_channels={PIXEL_CHANNELS}"])
    torch.manual_seed(0)
    return _save_checkpoint(tmp_path_factory.mktemp("pixel_ckpt"), cfg, PixelBackbone.from_config(cfg.model))


@pytest.fixture(scope="module")
def pixel_onnx(pixel_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pixel_onnx") / "pixel.onnx")
    return path, E.export_checkpoint(pixel_ckpt, path)


@pytest.fixture(scope="module")
def sd_ckpt(tmp_path_factory):
    from flowsr.tiny import tiny_config

    cfg = tiny_config(str(tmp_path_factory.mktemp("tiny_models")))
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model)
    with torch.no_grad():  # a LoRA that changes the output, so that merging it matters
        for p in backbone.trainable_parameters():
            p.normal_(0, 0.05)
    return _save_checkpoint(tmp_path_factory.mktemp("sd_ckpt"), cfg, backbone)


@pytest.fixture(scope="module")
def sd_onnx(sd_ckpt, tmp_path_factory):
    """Exported through the command line."""
    from jobs.cli import main

    path = str(tmp_path_factory.mktemp("sd_onnx") / "sd.onnx")
    assert main(["export", sd_ckpt, path]) == 0
    return path


@pytest.fixture(scope="module")
def models(pixel_ckpt, pixel_onnx, sd_ckpt, sd_onnx):
    return {"pixel": (pixel_ckpt, pixel_onnx[0]), "sd": (sd_ckpt, sd_onnx)}


# ---- the exported file ------------------------------------------------------------------------------
def test_export_has_dynamic_dims_and_records_its_contract(pixel_onnx, sd_onnx):
    path, report = pixel_onnx
    for file, multiple in ((path, 2 ** (len(PIXEL_CHANNELS) - 1)), (sd_onnx, 8 * 2)):  # tiny SD: VAE 8, UNet 2 blocks
        model = onnx.load(file)
        for value in (model.graph.input[0], model.graph.output[0]):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == ["batch", 3, "height", "width"], dims  # a batch-1 example would have fixed 1
        assert model.graph.input[0].name == "lr_up" and model.graph.output[0].name == "sr"
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {E.DEFAULT_OPSET}
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["flowsr.size_multiple"] == str(multiple) and meta["flowsr.scale"] == "4"
        assert meta["flowsr.opset"] == str(E.DEFAULT_OPSET) and meta["flowsr.dtype"] == "fp32"
        assert "[-1, 1]" in meta["flowsr.input"] and f"multiples of {multiple}" in meta["flowsr.input"]
    assert report.max_error <= report.tolerance == E.TOLERANCE["fp32"] and not report.external_data
    assert sorted(os.listdir(os.path.dirname(path))) == ["pixel.onnx"]  # no staging leftovers


def test_model_card_names_the_export_and_the_contract(pixel_ckpt):
    from flowsr.checkpoint import model_card
    from flowsr.config import FlowSRConfig

    cfg = FlowSRConfig.load(os.path.join(pixel_ckpt, "config.json"))
    card = model_card(cfg, stage=2, step=10)
    assert "flowsr export CKPT model.onnx" in card and "--backend onnxruntime" in card
    assert "multiples of the size multiple (4;" in card and "[-1, 1]" in card and "NCHW" in card


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- onnx-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README's onnxruntime example is missing"
    return match.group(1)


@pytest.mark.parametrize("kind", ["pixel", "sd"])
def test_readme_example_matches_flowsr_upscaler(kind, models, tmp_path):
    """The README's standalone onnxruntime example (OpenCV resize, numpy padding, no project code)
    against the torch upscaler on the same image, whole image, no colour fix: within 1 level."""
    ckpt, path = models[kind]
    image = _rgb(13, 21, seed=3)  # non-square, sizes not multiples of anything
    Image.fromarray(image).save(tmp_path / "in.png")
    os.symlink(path, tmp_path / "model.onnx")
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 12
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    got = np.asarray(Image.open(tmp_path / "out.png")).astype(int)
    torch_sr = FlowSRUpscaler.from_pretrained(ckpt, scale=4, tile=None, vae_tile=None, color_fix="none", bucket=1,
                                              device="cpu")(Image.fromarray(image))
    want = np.asarray(torch_sr).astype(int)
    assert got.shape == want.shape == (52, 84, 3)
    assert np.abs(got - want).max() <= LEVEL
    assert np.abs(want - np.asarray(Image.fromarray(image).resize((84, 52), Image.BICUBIC)).astype(int)).max() > 8


# ---- the onnxruntime upscaler against the torch one ---------------------------------------------------
@pytest.mark.parametrize("kind, tile, overlap, batch", [("pixel", 24, 8, 4), ("pixel", 40, 12, 1),
                                                        ("sd", 32, 16, 4), ("sd", 48, 16, 1)])
def test_onnx_upscaler_matches_torch_upscaler(kind, tile, overlap, batch, models):
    """Tiled (two tile sizes), wavelet colour fix, batches of 4 mixed sizes and of 1, non-square."""
    from pipeline.onnx_models import OnnxUpscaler

    ckpt, path = models[kind]
    options = dict(scale=2, tile=tile, tile_overlap=overlap, color_fix="wavelet", tile_batch=3, bucket=16)
    images = [_rgb(19, 27, 0), _rgb(16, 24, 1), _rgb(27, 13, 2)[..., :1], _rgb(19, 27, 4)][:batch]
    want, _ = Upscaler(ckpt, vae_tile=None, device="cpu", **options).upscale_images(images)
    onnx_upscaler = OnnxUpscaler(path, **options)
    got, seconds = onnx_upscaler.upscale_images(images)
    for image, a, b in zip(images, got, want):
        assert a.shape == b.shape == (image.shape[0] * 2, image.shape[1] * 2, image.shape[2]) and a.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= LEVEL
    assert all(s > 0 for s in seconds)
    assert FlowSRUpscaler(onnx_upscaler).scale == 2  # the PIL front end takes either upscaler


# ---- the self-check ---------------------------------------------------------------------------------
def _perturbed(model, amount: float):
    """A copy of `model` with its largest weight tensor shifted by `amount`."""
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(amount), init.name))
    return model


def test_export_refuses_a_graph_that_differs_from_torch(pixel_ckpt, pixel_onnx, monkeypatch, tmp_path):
    """The graph is swapped for the good export with one weight shifted: refused, nothing written;
    the same swap unshifted is accepted (the refusal is the shift's)."""
    good = onnx.load(pixel_onnx[0])
    target = tmp_path / "out" / "model.onnx"
    monkeypatch.setattr(E, "_onnx_model", lambda *a, **k: _perturbed(good, 0.05))
    with pytest.raises(E.ExportError, match=r"differs from torch by .* \(> tolerance 0.002\); nothing written"):
        E.export_checkpoint(pixel_ckpt, str(target))
    assert os.listdir(target.parent) == []
    monkeypatch.setattr(E, "_onnx_model", lambda *a, **k: _perturbed(good, 0.0))
    assert E.export_checkpoint(pixel_ckpt, str(target)).max_error <= E.TOLERANCE["fp32"]
    assert os.listdir(target.parent) == ["model.onnx"]


def test_cli_refused_export_is_one_line_exit_2(pixel_ckpt, pixel_onnx, monkeypatch, tmp_path, capsys):
    from jobs.cli import main

    good = onnx.load(pixel_onnx[0])
    monkeypatch.setattr(E, "_onnx_model", lambda *a, **k: _perturbed(good, 0.05))
    assert main(["export", pixel_ckpt, str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowsr export: error: the exported graph differs from torch")
    assert not (tmp_path / "m.onnx").exists()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "m.onnx")]) == 2
    assert "is not a FlowSR checkpoint" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_fp16_with_external_data(pixel_ckpt, pixel_onnx, monkeypatch, tmp_path):
    """fp16 inside, float32 at the edges; weights in OUT.onnx.data (the >2 GiB path, threshold lowered)."""
    from onnx import TensorProto

    good = onnx.load(pixel_onnx[0])
    monkeypatch.setattr(E, "_onnx_model", lambda *a, **k: onnx.ModelProto.FromString(good.SerializeToString()))
    from flowsr.checkpoint import load_for_inference

    backbone, _ = load_for_inference(pixel_ckpt)
    path = tmp_path / "half.onnx"
    report = E.export_onnx(backbone, str(path), dtype="fp16", external_over=1)
    assert report.external_data and sorted(os.listdir(tmp_path)) == ["half.onnx", "half.onnx.data"]
    model = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert {t.data_type for t in model.graph.initializer if int(np.prod(t.dims)) > 64} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = torch.rand(3, 3, 20, 28) * 2 - 1
    half = ort.InferenceSession(str(path)).run(["sr"], {"lr_up": x.numpy()})[0]
    full = ort.InferenceSession(pixel_onnx[0]).run(["sr"], {"lr_up": x.numpy()})[0]
    assert half.dtype == np.float32 and 0 < np.abs(half - full).max() <= E.TOLERANCE["fp16"]


def test_export_refuses_models_it_cannot_export(pixel_ckpt, tmp_path):
    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]", "model.flow_source=noise"])
    with pytest.raises(E.ExportError, match="only flow_source 'sr_flow'"):
        E.one_step_module(PixelBackbone.from_config(cfg.model))
    from flowsr.checkpoint import load_for_inference

    with pytest.raises(E.ExportError, match="unknown dtype"):
        E.export_onnx(load_for_inference(pixel_ckpt)[0], str(tmp_path / "m.onnx"), dtype="int8")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(E.ExportError, match="not a FlowSR export"):
        E.read_contract(str(tmp_path / "plain.onnx"))
    for fixed in ([1, 3, "height", "width"], ["batch", 3, 64, "width"]):  # what a specialised export would give
        image = onnx.helper.make_tensor_value_info("lr_up", onnx.TensorProto.FLOAT, fixed)
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["lr_up"], ["sr"])], "g", [image],
                                       [onnx.helper.make_tensor_value_info("sr", onnx.TensorProto.FLOAT, fixed)])
        with pytest.raises(E.ExportError, match="batch, height and width dynamic"):
            E._check_dynamic(onnx.helper.make_model(graph))


# ---- the upscale job --------------------------------------------------------------------------------
def test_backend_must_fit_the_model(pixel_ckpt, pixel_onnx, tmp_path, capsys):
    from jobs.cli import main
    from pipeline import sr_models as M
    from pipeline import upscale_config

    path = pixel_onnx[0]
    assert upscale_config.BACKENDS == M.BACKENDS
    assert M.backend_for(path) == "onnxruntime" and M.backend_for(pixel_ckpt) == "torch"
    with pytest.raises(M.ModelError, match="export it with `flowsr export"):
        M.backend_for(pixel_ckpt, "onnxruntime")
    with pytest.raises(M.ModelError, match="--backend onnxruntime"):
        M.backend_for(path, "torch")
    (tmp_path / "in").mkdir()
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "in" / "a.png")
    for argv, message in ((["-m", pixel_ckpt, "--backend", "onnxruntime"], "flowsr export"),
                          (["-m", path, "--steps", "2"], "runs one step"),
                          (["-m", path, "--dtype", "bf16"], "dtype it was exported in")):
        code = main(["upscale", str(tmp_path / "in"), str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1] and err[-1].startswith("flowsr upscale: error:")
    assert not (tmp_path / "out").exists()


def test_upscale_job_onnx_backend_matches_torch_backend(ray_local, pixel_ckpt, pixel_onnx, tmp_path):
    """The same images through the job with each backend: every output within one level; the
    onnxruntime run resumes (a rerun skips every output)."""
    import pyarrow.parquet as pq

    from jobs.cli import main

    src = tmp_path / "in"
    src.mkdir()
    images = {"a.png": _rgb(20, 30), "b.png": _rgb(17, 11, 1), "c.png": _rgb(16, 16, 2)[..., 0]}
    for name, array in images.items():
        Image.fromarray(array).save(src / name)
    common = ["-s", "2", "-t", "12", "--tile-overlap", "4", "--batch-size", "3"]
    assert main(["upscale", str(src), str(tmp_path / "torch"), "-m", pixel_ckpt, "--vae-tile", "0", *common]) == 0
    onnx_argv = ["upscale", str(src), str(tmp_path / "onnx"), "-m", pixel_onnx[0], "--backend", "onnxruntime", *common]
    assert main(onnx_argv) == 0
    rows = pq.read_table(tmp_path / "onnx" / "manifest.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    for name, array in images.items():
        a = np.asarray(Image.open(tmp_path / "onnx" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "torch" / name)).astype(int)
        assert a.shape == b.shape == (array.shape[0] * 2, array.shape[1] * 2, *array.shape[2:])
        assert np.abs(a - b).max() <= LEVEL
    assert main(onnx_argv) == 0
    rows = pq.read_table(tmp_path / "onnx" / "manifest.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["skipped"] * 3


def test_cli_lists_export_with_its_options(capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and re.search(r"^\s+export\s", capsys.readouterr().out, re.M)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {fp32,fp16}" in text and "(default: 20)" in text and "--tolerance" in text
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    assert "--backend {torch,onnxruntime}" in capsys.readouterr().out


def test_execution_providers_follow_the_device(monkeypatch):
    from pipeline import onnx_models as O

    assert O.providers_for(torch.device("cpu")) == ("CPUExecutionProvider",)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="install onnxruntime-gpu"):
        O.providers_for(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert O.providers_for(None) == ("CPUExecutionProvider",)  # a GPU, but a CPU-only onnxruntime
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert O.providers_for(None) == O.providers_for(torch.device("cuda")) == ("CUDAExecutionProvider",
                                                                                "CPUExecutionProvider")
