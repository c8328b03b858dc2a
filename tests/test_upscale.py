"""Bulk upscaling: tiled inference, colour fixes, file formats, the Ray Data job and its resume."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowsr import color

from flowsr import sample as S

from flowsr import tiling as T
from flowsr.backbones import PixelBackbone, build_backbone
from flowsr.config import apply_overrides, preset
from pipeline import image_codecs, naming, upscale_manifest
from pipeline import inputs as pipeline_inputs
from pipeline import upscale_stages as stages

EXIF_ORIENTATION = 0x0112


# ---- fixtures -----------------------------------------------------------------------------------
def _save_inference_checkpoint(directory, cfg, backbone) -> str:
    os.makedirs(directory, exist_ok=True)
    cfg.save(os.path.join(directory, "config.json"))
    backbone.save_trainable(os.path.join(directory, "student"))
    return str(directory)


@pytest.fixture(scope="module")
def pixel_cfg():
    return apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]"])


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory, pixel_cfg):
    torch.manual_seed(0)
    backbone = PixelBackbone.from_config(pixel_cfg.model)
    return _save_inference_checkpoint(tmp_path_factory.mktemp("pixel_ckpt"), pixel_cfg, backbone)


@pytest.fixture(scope="module")
def stage(pixel_ckpt):
    """The upscaling stage, without Ray, at a non-integer scale."""
    return stages.UpscaleStage(pixel_ckpt, scale=1.5, tile=None, vae_tile=None, color_fix="wavelet")


def _rgb(h, w, seed=0):
    """A smooth uint8 RGB test image (gradients plus a few shapes)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 4) ** 2] = (230, 40, 60 + seed)
    return img.astype(np.uint8)


# ---- tiling ---------------------------------------------------------------------------------------
def test_tile_starts_cover_with_overlap():
    for length, tile, overlap in [(100, 32, 8), (64, 64, 8), (65, 64, 8), (7, 32, 4), (1000, 96, 16)]:
        starts = T.tile_starts(length, tile, overlap)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))


def test_single_tile_equals_untiled_and_super_resolve(pixel_ckpt):
    from flowsr.checkpoint import load_for_inference

    backbone, _ = load_for_inference(pixel_ckpt)
    lr = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(scale=4, color_fix="none")
    untiled = S.upscale(backbone, lr, tile=None, vae_tile=None, **kw)
    tiled = S.upscale(backbone, lr, tile=128, tile_overlap=16, vae_tile=128, **kw)
    reference = S.super_resolve(backbone, S.resize_to(lr, (48, 64)))
    assert untiled.shape == (2, 3, 48, 64)
    assert (tiled - untiled).abs().max() < 1e-5
    assert (untiled - reference).abs().max() < 1e-5


class ExactFlow(torch.nn.Module):
    """A model with a known HR: HR = LR + a * Laplacian(LR) (an unsharp mask), run as an exact
    one-step flow. Its 'VAE' is a space-to-depth by 2 (latent_factor 2, exactly invertible), its
    velocity at t = 1 is exactly x_LR - x_HR: a 3x3 stencil with zero padding, so a tile's border
    pixels are wrong and only the blending hides them."""

    latent_factor = 2
    AMOUNT = 0.5

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(flow_source="sr_flow")
        self.register_buffer("stencil", torch.tensor([[0., 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3).clone())

    def laplacian(self, x):
        return F.conv2d(x, self.stencil.to(x.dtype), padding=1, groups=3)

    def encode(self, img):
        return F.pixel_unshuffle(img, 2)

    def decode(self, z):
        return F.pixel_shuffle(z, 2)

    def velocity(self, x, t, cond=None):
        return self.encode(-self.AMOUNT * self.laplacian(self.decode(x)))

    def known_hr(self, lr_up):
        return (lr_up + self.AMOUNT * self.laplacian(F.pad(lr_up, (1, 1, 1, 1), mode="replicate"))[..., 1:-1, 1:-1])


def test_exact_flow_tiled_matches_untiled_on_a_large_image():
    from skimage import data

    model = ExactFlow()
    lr = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # 64x64
    kw = dict(scale=3, color_fix="none")
    untiled = S.upscale(model, lr, tile=None, vae_tile=None, **kw)
    tiled = S.upscale(model, lr, tile=64, tile_overlap=16, vae_tile=48, tile_batch=5, **kw)
    assert tiled.shape == untiled.shape == (1, 3, 192, 192)
    lr_up = S.resize_to(lr, (192, 192))
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the untiled run zero-pads at the border
    assert (untiled - model.known_hr(lr_up).clamp(-1, 1))[interior].abs().max() < 1e-5
    assert (tiled - untiled).abs().mean() < 1 / 255
    seams = S.upscale(model, lr, tile=64, tile_overlap=0, vae_tile=None, **kw)  # no overlap: visible seams
    assert (seams - untiled).abs().max() > 10 / 255


def test_upscale_any_scale_is_deterministic(pixel_ckpt):
    from flowsr.checkpoint import load_for_inference

    backbone, _ = load_for_inference(pixel_ckpt)
    lr = torch.rand(1, 3, 10, 15, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for scale, size in [(2.5, (25, 38)), (1.0, (10, 15)), (0.5, (5, 8))]:
        a = S.upscale(backbone, lr, scale, tile=16, tile_overlap=4, vae_tile=16)
        assert a.shape[-2:] == size and a.abs().max() <= 1
        assert torch.equal(a, S.upscale(backbone, lr, scale, tile=16, tile_overlap=4, vae_tile=16))
    with pytest.raises(ValueError):
        S.upscale(backbone, lr, 2, color_fix="histogram")
    with pytest.raises(ValueError):
        S.upscale(backbone, lr, 2, tile=16, tile_overlap=16)


# ---- colour fixes -------------------------------------------------------------------------------
def test_color_fixes():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    style = torch.rand(2, 3, 40, 40, generator=g) * 0.5
    high, low = color.wavelet_decomposition(content)
    assert torch.allclose(high + low, content, atol=1e-5)
    fixed = color.adain_color_fix(content, style)
    assert torch.allclose(fixed.mean((-2, -1)), style.mean((-2, -1)), atol=1e-4)
    assert torch.allclose(fixed.std((-2, -1)), style.std((-2, -1)), atol=1e-3)
    wave = color.wavelet_color_fix(content, style)
    assert torch.allclose(color.wavelet_decomposition(wave)[1], color.wavelet_decomposition(style)[1], atol=0.05)
    assert torch.allclose(color.wavelet_color_fix(style, style), style, atol=1e-5)
    with pytest.raises(ValueError):
        color.color_correct(content, style, "histogram")


# ---- listing and names ----------------------------------------------------------------------------
def test_listing_and_output_names(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "sub/b.webp", "c.tif", "notes.txt"):
        (root / name).write_bytes(b"x")
    listed = pipeline_inputs.list_inputs(str(root))
    assert [rel for _, rel in listed] == ["a.jpg", "a.png", "c.tif", "sub/b.webp"]
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(root / "**" / "*.webp"))] == ["sub/b.webp"]
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(root / "*.png"))] == ["a.png"]
    assert pipeline_inputs.list_inputs(str(root / "a.png")) == [(str(root / "a.png"), "a.png")]
    table = pa.table({"path": [str(root / "sub/b.webp"), str(root / "a.png")]})
    pq.write_table(table, tmp_path / "list.parquet")
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(tmp_path / "list.parquet"))] == ["a.png", "sub/b.webp"]
    rows = naming.plan_outputs(listed, "/out", "png")
    assert [r["output"] for r in rows] == ["/out/a.jpg.png", "/out/a.png", "/out/c.png", "/out/sub/b.png"]
    assert [r["output"] for r in naming.plan_outputs(listed, "/out", "same", "_x4")][2:] == ["/out/c_x4.png",
                                                                                        "/out/sub/b_x4.webp"]
    with pytest.raises(ValueError):
        naming.output_name("a.png", "gif")


# ---- formats: decode -> upscale -> write, without Ray ----------------------------------------------
def _save(path, array, **kw):
    if array.dtype == np.uint16:  # Pillow cannot write 16-bit colour
        order = {3: [2, 1, 0], 4: [2, 1, 0, 3]}.get(array.shape[-1] if array.ndim == 3 else 0)
        cv2.imwrite(str(path), array[..., order] if order else array)
    else:
        Image.fromarray(array).save(path, **kw)


def _exif_rotated_jpeg(path):
    im = Image.fromarray(_rgb(20, 30))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display = rotate 90 degrees clockwise: 30 x 20
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def _read_back(path):
    """(array as stored, Pillow mode); 16-bit colour, which Pillow reads as 8 bits, via OpenCV."""
    with Image.open(path) as im:
        mode, array = im.mode, np.asarray(im)
    wide = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if wide is not None and wide.ndim == 3 and wide.dtype == np.uint16:
        array = wide[..., [2, 1, 0, 3][:wide.shape[2]]]
    return array, mode


def _process(stage, rows, output_root):
    batch = stages.probe_batch({"input": [r["input"] for r in rows], "output": [r["output"] for r in rows]},
                            scale=stage.upscaler.options["scale"])
    return stages.write_batch(stage(stages.decode_batch(batch)), output_root=output_root)


ALPHA = np.repeat((np.arange(30) >= 15).astype(np.uint8)[None] * 255, 20, 0)  # left transparent, right opaque
CASES = {  # name: (input file, array or writer, format, expected output (name, mode, dtype, shape))
    "rgb8_png": ("a.png", _rgb(20, 30), "same", ("a.png", "RGB", np.uint8, (30, 45, 3))),
    "rgba8_png": ("a.png", np.dstack([_rgb(20, 30), ALPHA]), "same", ("a.png", "RGBA", np.uint8, (30, 45, 4))),
    "gray8_png": ("a.png", _rgb(20, 30)[..., 0], "same", ("a.png", "L", np.uint8, (30, 45))),
    "gray_alpha_png": ("a.png", None, "same", ("a.png", "LA", np.uint8, (30, 45, 2))),
    "rgb16_png": ("a.png", _rgb(20, 30).astype(np.uint16) * 257, "same", ("a.png", "RGB", np.uint16, (30, 45, 3))),
    "rgba16_png": ("a.png", np.dstack([_rgb(20, 30), ALPHA]).astype(np.uint16) * 257, "same",
                   ("a.png", "RGBA", np.uint16, (30, 45, 4))),
    "gray16_png": ("a.png", _rgb(20, 30)[..., 0].astype(np.uint16) * 257, "same", ("a.png", "I;16", np.uint16, (30, 45))),
    "rgb16_to_jpg": ("a.png", _rgb(20, 30).astype(np.uint16) * 257, "jpg", ("a.jpg", "RGB", np.uint8, (30, 45, 3))),
    "gray_jpg": ("a.jpg", _rgb(20, 30)[..., 0], "same", ("a.jpg", "L", np.uint8, (30, 45))),
    "exif_jpg": ("a.jpg", _exif_rotated_jpeg, "png", ("a.png", "RGB", np.uint8, (45, 30, 3))),
    "webp": ("a.webp", _rgb(20, 30), "same", ("a.webp", "RGB", np.uint8, (30, 45, 3))),
    "rgba_webp": ("a.png", np.dstack([_rgb(20, 30), ALPHA]), "webp", ("a.webp", "RGBA", np.uint8, (30, 45, 4))),
    "rgba_to_jpg_keeps_alpha": ("a.png", np.dstack([_rgb(20, 30), ALPHA]), "jpg",
                                ("a.png", "RGBA", np.uint8, (30, 45, 4))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_round_trip(case, stage, tmp_path):
    name, source, fmt, (out_name, mode, dtype, shape) = CASES[case]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    if case == "gray_alpha_png":
        Image.fromarray(np.dstack([_rgb(20, 30)[..., 0], ALPHA]), mode="LA").save(path)
    elif callable(source):
        source(path)
    else:
        _save(path, source)
    rows = naming.plan_outputs(pipeline_inputs.list_inputs(str(tmp_path / "in")), str(tmp_path / "out"), fmt)
    out = _process(stage, rows, str(tmp_path / "out"))
    assert out["status"] == ["ok"], out["error"]
    assert out["output"] == [str(tmp_path / "out" / out_name)]
    array, got_mode = _read_back(out["output"][0])
    assert got_mode == mode and array.dtype == dtype and array.shape == shape
    if len(shape) == 3 and shape[2] in (2, 4):  # the alpha was upscaled separately, bicubic
        alpha = array[..., -1].astype(float) / np.iinfo(dtype).max
        assert alpha[:, :20].max() < 0.05 and alpha[:, 25:].min() > 0.95
    if case == "exif_jpg":  # the content is the EXIF-rotated image (its colours via the wavelet fix)
        small = cv2.resize(array, (20, 30), interpolation=cv2.INTER_AREA).astype(float)
        right, wrong = np.rot90(_rgb(20, 30), k=-1), np.rot90(_rgb(20, 30), k=1)
        assert np.abs(small - right).mean() < np.abs(small - wrong).mean() / 2
    assert image_codecs.is_valid_output(out["output"][0], shape[:2])
    assert not os.listdir(tmp_path / "out" / naming.TMP_DIR)


def test_bad_file_is_an_error_row_and_invalid_output_is_redone(stage, tmp_path):
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "good.png", _rgb(8, 8))
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = naming.plan_outputs(pipeline_inputs.list_inputs(str(tmp_path / "in")), str(tmp_path / "out"), "same")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "good.png").write_bytes(b"\x89PNG truncated by someone else")
    out = _process(stage, rows, str(tmp_path / "out"))
    assert dict(zip(out["input"], out["status"])) == {rows[0]["input"]: "error", rows[1]["input"]: "ok"}
    assert out["error"][0].startswith("probe:") and out["error"][1] == ""
    assert image_codecs.is_valid_output(str(tmp_path / "out" / "good.png"), (12, 12))


def test_a_write_batch_commits_its_manifest_part_before_its_images(stage, tmp_path, monkeypatch):
    """Killed while moving a batch's images into place: every image on disk has its manifest row
    (the part is committed first). The retried batch replaces that part instead of adding one."""
    (tmp_path / "in").mkdir()
    for k in range(3):
        _save(tmp_path / "in" / f"{k}.png", _rgb(8, 8, k))
    rows = naming.plan_outputs(pipeline_inputs.list_inputs(str(tmp_path / "in")), str(tmp_path / "out"), "same")
    probed = stages.probe_batch({"input": [r["input"] for r in rows], "output": [r["output"] for r in rows]}, scale=1.5)
    upscaled = stage(stages.decode_batch(probed))
    parts = str(tmp_path / "out" / naming.PARTS_DIR)
    moved, publish = [], stages._publish

    def dying_publish(tmp, uri):
        if moved:
            raise KeyboardInterrupt  # the process dies after the first image was moved
        publish(tmp, uri)
        moved.append(uri)
    monkeypatch.setattr(stages, "_publish", dying_publish)
    with pytest.raises(KeyboardInterrupt):
        stages.write_batch(upscaled, output_root=str(tmp_path / "out"), parts_dir=parts)
    recorded = upscale_manifest.read_manifest_parts(parts).to_pylist()
    assert sorted(r["input"] for r in recorded) == sorted(r["input"] for r in rows)
    assert {r["status"] for r in recorded} == {"ok"} and {r["out_height"] for r in recorded} == {12}
    written = sorted(str(p) for p in (tmp_path / "out").glob("*.png"))
    assert written == moved and set(written) <= {r["output"] for r in recorded}
    monkeypatch.setattr(stages, "_publish", publish)
    again = stages.write_batch(upscaled, output_root=str(tmp_path / "out"), parts_dir=parts)
    assert again["status"] == ["ok"] * 3 and len(os.listdir(parts)) == 1
    assert upscale_manifest.read_manifest_parts(parts).num_rows == 3


# ---- the Ray Data job ---------------------------------------------------------------------------
def _corpus(root):
    """Good files of several sizes and kinds, and a few bad ones."""
    (root / "sub").mkdir(parents=True)
    good = {"a.png": _rgb(20, 30), "b.png": _rgb(20, 30, 1), "sub/c.jpg": _rgb(16, 16),
            "sub/d.png": np.dstack([_rgb(12, 20), ALPHA[:12, :20]]), "e.webp": _rgb(21, 13)[..., 0],
            "f.png": _rgb(9, 9).astype(np.uint16) * 257}
    for name, array in good.items():
        _save(root / name, array)
    data = (root / "a.png").read_bytes()
    bad = {"trunc.png": data[:len(data) // 2], "empty.jpg": b"", "text.png": b"hello", "sub/zero.webp": b"\0" * 64}
    for name, blob in bad.items():
        (root / name).write_bytes(blob)
    return good, bad


def _files(root):  # the output's own records (_run.json) left out
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.startswith("_"))


def _manifest(path):
    return {r["input"]: r for r in pq.read_table(path).to_pylist()}


def test_job_bad_files_outputs_and_rerun(ray_local, pixel_ckpt, tmp_path):
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    good, bad = _corpus(tmp_path / "in")
    cfg = UpscaleJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=pixel_ckpt,
                           scale=2, tile=32, tile_overlap=8, batch_size=3, pool_size=1)
    summary = upscale_corpus(cfg)
    assert (summary["total"], summary["ok"], summary["error"], summary["skipped"]) == (10, 6, 4, 0)
    rows = _manifest(summary["manifest"])
    for name in bad:
        row = rows[str(tmp_path / "in" / name)]
        assert row["status"] == "error" and row["error"]
    expected = {"a.png": (40, 60), "b.png": (40, 60), "sub/c.jpg": (32, 32), "sub/d.png": (24, 40),
                "e.webp": (42, 26), "f.png": (18, 18)}
    for name, size in expected.items():
        row = rows[str(tmp_path / "in" / name)]
        assert row["status"] == "ok" and (row["out_height"], row["out_width"]) == size and row["seconds"] > 0
        assert image_codecs.is_valid_output(row["output"], size)
    assert _files(tmp_path / "out") == sorted(["manifest.parquet", *expected])
    assert cv2.imread(str(tmp_path / "out" / "f.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    with Image.open(tmp_path / "out" / "sub" / "d.png") as im:
        assert im.mode == "RGBA"
    mtimes = {n: os.stat(tmp_path / "out" / n).st_mtime_ns for n in expected}
    again = upscale_corpus(cfg)
    assert (again["ok"], again["skipped"], again["error"]) == (0, 6, 4)
    assert mtimes == {n: os.stat(tmp_path / "out" / n).st_mtime_ns for n in expected}


def test_job_crash_and_rerun_writes_each_output_once(ray_local, pixel_ckpt, tmp_path, run_until_killed,
                                                     upscale_killed_at_first_output):
    """A real crash: the upscale job runs in a subprocess (on this module's Ray) whose driver
    SIGKILLs itself when the first committed batch reaches it. What exists is complete (atomic
    writes) and has its row in the killed run's manifest parts; the rerun skips exactly those,
    writes each of the others once and lists every input once."""
    import signal
    import sys
    from pathlib import Path

    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    (tmp_path / "in").mkdir()
    n = 24
    names = [f"img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        _save(tmp_path / "in" / name, _rgb(64, 48, i))
    out = tmp_path / "out"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", upscale_killed_at_first_output, "--input", str(tmp_path / "in"), "--output", str(out),
            "--checkpoint", pixel_ckpt, "--scale", "4", "--batch-size", "1", "--tile", "0", "--num-gpus", "0",
            "--address", ray_local.get_runtime_context().gcs_address]
    outputs = lambda: [m for m in _files(out) if m.endswith(".png") and not m.startswith(naming.TMP_DIR)]
    proc = run_until_killed(argv, lambda: _files(out) if out.exists() else [], cwd=root, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = outputs()
    assert 1 <= len(first) < n, f"{len(first)} of {n} outputs before the kill"
    for name in first:  # atomic writes: whatever exists is complete
        assert image_codecs.is_valid_output(str(out / name), (256, 192))
    parts = upscale_manifest.read_manifest_parts(str(out / naming.PARTS_DIR)).to_pylist()
    assert len({r["input"] for r in parts}) == len(parts)  # no input twice
    recorded = {r["output"]: r for r in parts}
    for name in first:  # each committed output has its row: a manifest part is committed before its images
        row = recorded[str(out / name)]
        assert row["status"] == "ok" and (row["out_height"], row["out_width"]) == (256, 192)
    before = {name: (out / name).stat().st_mtime_ns for name in first}
    cfg = UpscaleJobConfig(input=str(tmp_path / "in"), output=str(out), checkpoint=pixel_ckpt, scale=4,
                           batch_size=1, tile=0)
    summary = upscale_corpus(cfg)
    assert summary["skipped"] == len(first) and summary["ok"] == n - len(first)
    assert {name: (out / name).stat().st_mtime_ns for name in first} == before  # not rewritten
    assert _files(out) == sorted(["manifest.parquet", *names])  # the parts were consolidated and removed
    inputs = pq.read_table(summary["manifest"]).column("input").to_pylist()
    assert sorted(inputs) == sorted(str(tmp_path / "in" / name) for name in names)  # each input exactly once
    rows = _manifest(summary["manifest"])
    assert {r["status"] for r in rows.values()} <= {"ok", "skipped"}
    assert all(image_codecs.is_valid_output(str(out / name), (256, 192)) for name in names)


def test_driver_holds_counters_not_rows_and_the_manifest_lists_each_input_once(ray_local, pixel_ckpt, tmp_path,
                                                                                 monkeypatch):
    """The driver never collects rows: the listing streams into bounded chunks (a folder at a
    time), probing, ordering and writing run in Ray Data, and the driver only receives counts.
    The manifest, built from the committed parts, lists every input exactly once: for a folder,
    for a Parquet list (planned per folder inside Ray Data; a path listed twice is one input) and
    after a rerun."""
    import ray.data

    from jobs import upscale as job
    from pipeline import output as layer
    from pipeline import upscale_flow
    from pipeline.upscale_config import UpscaleJobConfig

    root = tmp_path / "in"
    for k, name in enumerate(("a/x.png", "a/x.jpg", "b/y.png", "b/z.png", "c/w.png")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _save(root / name, _rgb(12, 10, k))
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    inputs = sorted(str(p) for p in root.rglob("*") if p.is_file())

    def collect(*args, **kwargs):
        raise AssertionError("the driver collected rows")
    for name in ("take_all", "take", "take_batch", "to_pandas", "iter_rows", "to_arrow_refs"):
        monkeypatch.setattr(ray.data.Dataset, name, collect)
    monkeypatch.setattr(ray.data, "from_items", collect)
    monkeypatch.setattr(pipeline_inputs, "scan_inputs", collect)  # the whole listing as a list
    received, chunk_rows = [], []
    iter_batches = ray.data.Dataset.iter_batches

    def spy_iter_batches(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append((set(batch.column_names), batch.num_rows))
            yield batch
    write_parquet_atomic = layer.write_parquet_atomic

    def spy_write(fs, path, table, *args, **kwargs):
        if "/listing-" in path:
            chunk_rows.append(table.num_rows)
        return write_parquet_atomic(fs, path, table, *args, **kwargs)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy_iter_batches)
    monkeypatch.setattr(layer, "write_parquet_atomic", spy_write)
    monkeypatch.setattr(upscale_flow, "LISTING_CHUNK_ROWS", 2)

    def run(source, out):
        cfg = UpscaleJobConfig(input=str(source), output=str(out), checkpoint=pixel_ckpt, scale=2, tile=0,
                               batch_size=2, format="png")
        summary = job.upscale_corpus(cfg)
        table = pq.read_table(summary["manifest"])
        assert not list((out / naming.PARTS_DIR).glob("*"))
        return summary, table.column("input").to_pylist(), dict(zip(table.column("input").to_pylist(),
                                                                     table.column("status").to_pylist()))

    summary, listed, status = run(root, tmp_path / "out")
    assert sorted(listed) == inputs  # each input exactly once
    assert (summary["ok"], summary["error"], summary["unsupported"]) == (5, 1, 1)
    assert len(chunk_rows) >= 3 and max(chunk_rows) <= 3  # chunks of at least 2 rows, cut at a folder's end
    # counts, and a pending part per probe unit (PROBE_BLOCK inputs), never rows
    counters = {"pending", "skipped", "error", "unsupported", "ok", "pending_part", "pending_rows", "pending_bucket"}
    assert received and all(columns <= counters for columns, _ in received)
    again, listed, status = run(root, tmp_path / "out")
    assert sorted(listed) == inputs and (again["skipped"], again["ok"]) == (5, 0)

    images = [i for i in inputs if not i.endswith(".txt")]  # a listed file is probed whatever its extension
    listing = [*images, images[0], str(root / "a") + "/../a/x.png"]  # listed twice; listed again by another path
    pq.write_table(pa.table({"path": listing}), tmp_path / "list.parquet")
    summary, listed, status = run(tmp_path / "list.parquet", tmp_path / "out2")
    assert sorted(listed) == sorted(set(listing)) and summary["ok"] == 6
    outputs = pq.read_table(summary["manifest"]).column("output").to_pylist()
    assert len(set(outputs)) == 7 == len(outputs)  # no two inputs share an output
    assert str(tmp_path / "out2" / "a" / "x.jpg.png") in outputs  # the folder's collision rule


def test_cli_upscale_with_the_tiny_sd_backbone(ray_local, tmp_path):
    from jobs.cli import main
    from flowsr.tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "tiny"))
    torch.manual_seed(0)
    ckpt = _save_inference_checkpoint(tmp_path / "sd_ckpt", cfg, build_backbone(cfg.model))
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "x.png", _rgb(24, 20))
    _save(tmp_path / "in" / "y.jpg", _rgb(13, 17))
    assert main(["upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", ckpt, "-s", "2",
                 "-t", "32", "--tile-overlap", "8", "--vae-tile", "32", "--format", "png"]) == 0
    rows = _manifest(tmp_path / "out" / "manifest.parquet")
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert image_codecs.is_valid_output(str(tmp_path / "out" / "x.png"), (48, 40))
    assert image_codecs.is_valid_output(str(tmp_path / "out" / "y.png"), (26, 34))


def test_rerun_with_other_settings_is_refused_overwrite_replaces(ray_local, pixel_ckpt, tmp_path):
    """The run record: another color fix (or checkpoint) into the same OUT is refused in one line,
    the old images stay; --overwrite rewrites every image with the new settings."""
    import dataclasses
    import shutil

    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig
    from pipeline.output import OutputError

    (tmp_path / "in").mkdir()
    for name, seed in (("a.png", 0), ("b.png", 1)):
        _save(tmp_path / "in" / name, _rgb(16, 16, seed))
    cfg = UpscaleJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=pixel_ckpt,
                           scale=2, tile=0, batch_size=2)
    assert upscale_corpus(cfg)["ok"] == 2
    mtimes = {n: os.stat(tmp_path / "out" / n).st_mtime_ns for n in ("a.png", "b.png")}
    with pytest.raises(OutputError, match="color_fix: 'wavelet' -> 'none'.*--overwrite"):
        upscale_corpus(dataclasses.replace(cfg, color_fix="none"))
    assert mtimes == {n: os.stat(tmp_path / "out" / n).st_mtime_ns for n in mtimes}
    other_ckpt = tmp_path / "other_ckpt"
    shutil.copytree(pixel_ckpt, other_ckpt)
    assert dataclasses.replace(cfg, checkpoint=str(other_ckpt)).record() == cfg.record() | {
        "code_version": cfg.record()["code_version"]}  # same bytes elsewhere: same digest
    weights = max((p for p in other_ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(OutputError, match="checkpoint"):
        upscale_corpus(dataclasses.replace(cfg, checkpoint=str(other_ckpt)))
    replaced = upscale_corpus(dataclasses.replace(cfg, color_fix="none", overwrite=True))
    assert (replaced["ok"], replaced["skipped"]) == (2, 0)
    assert all(os.stat(tmp_path / "out" / n).st_mtime_ns > t for n, t in mtimes.items())
