"""Hostile corpora and operators: what a real photo bucket brings to the jobs (issue 22, round 2)."""
import hashlib
import os
import shutil
import subprocess
import sys
import zlib
from typing import Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import prepare_data as P
from pipeline import image_codecs, naming, pairs
from pipeline import inputs as pipeline_inputs
from pipeline import upscale_stages as stages
from pipeline.images import ImageTooLarge, load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PILLOW_BOMB_LIMIT = 178_956_970  # 2 x PIL.Image.MAX_IMAGE_PIXELS: what Pillow's own refusal quotes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, followed by data that is no image."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = b"IDAT" + b"\x00" * 16
    return b"".join([b"\x89PNG\r\n\x1a\n", (13).to_bytes(4, "big"), ihdr, zlib.crc32(ihdr).to_bytes(4, "big"),
                     (16).to_bytes(4, "big"), idat, zlib.crc32(idat).to_bytes(4, "big")])


# ---- limit messages name the project's own cap ----------------------------------------------------
DECLARED = [(10_000, 10_000), (20_000, 10_000), (100_000, 100_000)]  # 10^8, 2x10^8 (past Pillow's), 10^10


@pytest.mark.parametrize("width,height", DECLARED)
def test_limit_rows_quote_max_pixels_not_pillows_bomb_limit(tmp_path, width, height):
    data = png_header_only(width, height)
    with pytest.raises(ImageTooLarge) as raised:
        load_image(data, "big.png", max_pixels=40_000_000)
    assert "--max-pixels" in str(raised.value) and str(PILLOW_BOMB_LIMIT) not in str(raised.value)
    assert f"{width}x{height}" in str(raised.value)

    cfg = P.PrepareConfig(input=str(tmp_path), output=str(tmp_path / "out"), patch_size=32, max_pixels=40_000_000)
    rows, error = pairs.process_source(str(tmp_path / "big.png"), data, cfg)
    assert rows == [] and error["stage"] == "limit"
    assert "--max-pixels" in error["error"] and "40000000" in error["error"]
    assert str(PILLOW_BOMB_LIMIT) not in error["error"] and "decompression" not in error["error"].lower()

    (tmp_path / "big.png").write_bytes(data)
    probed = stages.probe_batch({"input": [str(tmp_path / "big.png")], "output": [str(tmp_path / "o" / "big.png")]},
                            scale=4.0, max_pixels=50_000_000)
    assert probed["status"] == [pipeline_inputs.ERROR]
    assert "--max-pixels" in probed["error"][0] and str(PILLOW_BOMB_LIMIT) not in probed["error"][0]


# ---- a TorchScript file is never executed ------------------------------------------------------------
class CreatesFileWhenLoaded(torch.nn.Module):
    """A scripted module whose `__setstate__` (run by `torch.jit.load`) creates the file at `path`."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.touched = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.touched = torch.from_file(self.path, True, 1, dtype=torch.uint8)  # opened with O_CREAT


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(a TorchScript file saved as .pt and as .pth, the file that loading it would create)."""
    root = tmp_path_factory.mktemp("scripted")
    marker = root / "created-by-setstate"
    torch.jit.save(torch.jit.script(CreatesFileWhenLoaded(str(marker))), str(root / "model.pt"))
    shutil.copy(root / "model.pt", root / "model.pth")
    torch.jit.load(str(root / "model.pt"))  # the archive does run code when loaded ...
    assert marker.exists()
    marker.unlink()
    return root, marker


@pytest.mark.parametrize("name", ["model.pt", "model.pth"])
def test_torchscript_weights_are_refused_without_running_them(scripted, name):
    from pipeline.sr_models import ModelError, describe, load_weights

    root, marker = scripted
    for load in (load_weights, describe):
        with pytest.raises(ModelError) as raised:
            load(str(root / name))
        assert not marker.exists()
        assert "TorchScript" in str(raised.value) and "\n" not in str(raised.value)


def test_torchscript_model_and_baseline_are_refused_by_the_jobs(scripted, tmp_path):
    root, marker = scripted
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    env = {**os.environ, "PYTHONPATH": REPO}
    for argv in (["-m", "jobs.upscale", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "up"), "-m", str(root / "model.pt")],
                 ["-m", "jobs.evaluate", "--data", str(tmp_path / "in"), "--lr-dir", str(tmp_path / "in"),
                  "--out", str(tmp_path / "ev"), "--baseline", f"x={root / 'model.pth'}"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line
                 and not line.startswith("  ")]
        assert not marker.exists(), done.stderr
        assert done.returncode == 2 and len(lines) == 1 and "TorchScript" in lines[0], done.stderr
    assert not (tmp_path / "up").exists()


# ---- an input changed in place is redone -------------------------------------------------------------
def _smooth(h, w, shift=0):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 9 + shift) % 256, (y * 7) % 256, ((x + y) * 5 + 2 * shift) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("ext,dtype", [(".png", np.uint8), (".png", np.uint16), (".jpg", np.uint8), (".webp", np.uint8)])
def test_outputs_record_the_digest_of_their_input(tmp_path, ext, dtype):
    colour = _smooth(6, 5).astype(dtype) * (257 if dtype == np.uint16 else 1)
    digest = hashlib.sha256(b"the input's bytes").hexdigest()
    (tmp_path / f"o{ext}").write_bytes(image_codecs.encode_image(colour, None, ext, None, digest))
    assert image_codecs.output_source(str(tmp_path / f"o{ext}"), (6, 5)) == digest
    assert image_codecs.output_source(str(tmp_path / f"o{ext}"), (5, 6)) is None  # not the expected size
    (tmp_path / f"p{ext}").write_bytes(image_codecs.encode_image(colour, None, ext))
    assert image_codecs.output_source(str(tmp_path / f"p{ext}"), (6, 5)) == ""  # valid, made from an unknown input


def test_rerun_redoes_inputs_whose_content_changed(ray_local, pixel_ckpt, tmp_path):
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    (tmp_path / "in").mkdir()
    for name, shift in (("a.png", 0), ("b.png", 40), ("c.jpg", 80)):
        Image.fromarray(_smooth(12, 10, shift)).save(tmp_path / "in" / name, quality=95)
    cfg = UpscaleJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), checkpoint=pixel_ckpt,
                           scale=2, tile=0, batch_size=2)

    def manifest():
        rows = pq.read_table(tmp_path / "out" / naming.MANIFEST_NAME).to_pylist()
        return {os.path.basename(r["input"]): r for r in rows}

    def sha(name):
        return hashlib.sha256((tmp_path / "in" / name).read_bytes()).hexdigest()
    first = upscale_corpus(cfg)
    assert (first["ok"], first["skipped"]) == (3, 0)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("a.png", "b.png", "c.jpg")}

    Image.fromarray(_smooth(12, 10, 7)).save(tmp_path / "in" / "a.png")  # edited in place, same size
    os.utime(tmp_path / "in" / "b.png", (1, 1))  # touched, same content
    second = upscale_corpus(cfg)
    rows = manifest()
    assert {n: r["status"] for n, r in rows.items()} == {"a.png": "ok", "b.png": "skipped", "c.jpg": "skipped"}
    assert (second["ok"], second["skipped"]) == (1, 2)
    assert {n: r["input_sha256"] for n, r in rows.items()} == {n: sha(n) for n in ("a.png", "b.png", "c.jpg")}
    assert (tmp_path / "out" / "a.png").read_bytes() != before["a.png"]
    assert all((tmp_path / "out" / n).read_bytes() == before[n] for n in ("b.png", "c.jpg"))
    third = upscale_corpus(cfg)
    assert (third["ok"], third["skipped"]) == (0, 3)


# ---- evaluate scores every good pair and names the rest ----------------------------------------------
def test_evaluate_gives_error_rows_for_bad_pairs_and_lists_unmatched_names(ray_local, tmp_path):
    import csv
    import json

    from jobs.evaluate import evaluate
    from pipeline.evaluation import EvalConfig

    for d in ("hr", "lr", "sr"):
        (tmp_path / d).mkdir()

    def pair(name, hr, lr, sr=True):
        Image.fromarray(hr).save(tmp_path / "hr" / f"{name}.png")
        Image.fromarray(lr).save(tmp_path / "lr" / f"{name}.png")
        if sr:
            Image.fromarray(hr).save(tmp_path / "sr" / f"{name}.png")
    hr = _smooth(32, 24)
    lr = np.asarray(Image.fromarray(hr).resize((6, 8), Image.BICUBIC))
    pair("good0", hr, lr)
    pair("good1", hr[::-1].copy(), lr[::-1].copy())
    pair("not_quarter", hr, _smooth(10, 10))  # LR is not HR / 4
    pair("tiny", _smooth(3, 3), _smooth(1, 1))  # a 3x3 HR
    pair("small", _smooth(4, 4), _smooth(1, 1))  # HR / 4 = LR, but nothing left inside the metrics' border
    pair("no_sr", hr, lr, sr=False)
    for d in ("hr", "lr", "sr"):
        (tmp_path / d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(hr).save(tmp_path / "hr" / "hr_only.png")
    Image.fromarray(lr).save(tmp_path / "lr" / "lr_only.png")
    cfg = EvalConfig(data=str(tmp_path / "hr"), lr_dir=str(tmp_path / "lr"), sr=(("oracle", str(tmp_path / "sr")),),
                     out=str(tmp_path / "out"), metrics=(), batch_size=2)
    summary = evaluate(cfg)

    rows = {r["sample_id"]: r for r in csv.DictReader((tmp_path / "out" / "per_image.csv").read_text().splitlines())}
    assert sorted(rows) == ["corrupt", "good0", "good1", "not_quarter", "small", "tiny"]
    for name in ("good0", "good1"):
        assert rows[name]["error"] == "" and float(rows[name]["bicubic/psnr"]) > 10
        assert rows[name]["oracle/psnr"] == "inf"
    for name in ("corrupt", "not_quarter", "small", "tiny"):
        assert rows[name]["error"] and rows[name]["bicubic/psnr"] in ("", "nan"), rows[name]
    assert "is not 4x LR" in rows["not_quarter"]["error"] and "is not 4x LR" in rows["tiny"]["error"]
    assert "too small" in rows["small"]["error"]
    assert summary["n_images"] == 2 and summary["errors"] == 4
    assert sorted(r["sample_id"] for r in summary["failed"]) == ["corrupt", "not_quarter", "small", "tiny"]
    # the means are over the scored pairs only
    expected = np.mean([float(rows[n]["bicubic/psnr"]) for n in ("good0", "good1")])
    assert summary["mean"]["bicubic"]["psnr"] == pytest.approx(expected)
    unmatched = {r["name"]: r["missing"] for r in summary["unmatched"]}
    assert unmatched == {"hr_only": "LR, SR oracle", "lr_only": "HR, SR oracle", "no_sr": "SR oracle"}
    assert summary["n_unmatched"] == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["unmatched"] == summary["unmatched"]
    report = (tmp_path / "out" / "report.html").read_text()
    table = (tmp_path / "out" / "table1.md").read_text()
    for name in ("hr_only", "lr_only", "no_sr", "corrupt", "not_quarter", "tiny", "small"):
        assert name in report and name in table


# ---- thin images: no seams the whole-image forward does not have -------------------------------------
def test_tile_shape_spends_the_tile_budget_along_a_thin_image():
    from flowsr.tiling import tile_shape

    assert tile_shape(512, 512, 64) == (64, 64)  # square tiles where both sides allow them
    assert tile_shape(40, 40, 64) == (40, 40)
    assert tile_shape(2, 600, 64, 2) == (2, 600)  # a strip within 64 x 64 pixels: one tile
    assert tile_shape(600, 2, 64, 2) == (600, 2)
    assert tile_shape(20, 4000, 64, 2) == (20, 204)  # 64^2 // 20, rounded down to the multiple
    assert tile_shape(4000, 20, 64, 2) == (204, 20)


@pytest.mark.parametrize("h,w", [(1, 300), (300, 1), (8, 120)])
def test_tiled_thin_image_equals_the_whole_image_forward(pixel_ckpt, h, w):
    """A network with normalisation is not local: square tiles of a strip gave each its own
    statistics, a step at every seam; a strip within the tile budget now runs as one tile."""
    from flowsr import sample as S
    from flowsr.checkpoint import load_for_inference

    backbone, _ = load_for_inference(pixel_ckpt)
    y, x = np.mgrid[0:h, 0:w]
    lr = torch.from_numpy(np.stack([np.sin(x / 9.0), np.cos(y / 7.0 + x / 13.0), (x + y) / (h + w) - 0.5], 0))
    lr = lr[None].float().clamp(-1, 1)
    for fix in ("none", "wavelet"):
        whole = S.upscale(backbone, lr, 2, tile=None, vae_tile=None, color_fix=fix)
        tiled = S.upscale(backbone, lr, 2, tile=64, tile_overlap=16, vae_tile=64, color_fix=fix)
        assert tiled.shape == whole.shape == (1, 3, 2 * h, 2 * w)
        assert (tiled - whole).abs().max() < 1e-5, fix


# ---- pair shards read as images by `datasets` with no extra arguments ------------------------------
def test_pair_shards_load_as_images_with_datasets_and_no_other_argument(tmp_path):
    import datasets

    from flowsr.data import decode_rgb
    from pipeline.pairs import make_pair, pairs_table
    from pipeline.pairs_dataset import write_shard
    from pipeline.schema import decode_png

    rng = np.random.default_rng(0)
    rows = [make_pair(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"mem://img{i}.png", 0, 0,
                      sample_id=f"{i:016x}", scale=4, seed=0, conversion="", degradation="bicubic") for i in range(3)]
    path = str(tmp_path / "pairs" / write_shard(pairs_table(rows), str(tmp_path / "pairs"))["shard"])
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["hr"], datasets.Image) and isinstance(ds.features["lr"], datasets.Image)
    assert ds.features["scale"] == datasets.Value("int32") and len(ds) == 3
    by_id = {r["sample_id"]: r for r in rows}
    for item in ds:
        assert item["hr"].size == (32, 32) and item["lr"].size == (8, 8)
        np.testing.assert_array_equal(np.asarray(item["hr"].convert("RGB")), decode_png(by_id[item["sample_id"]]["hr"]))
        np.testing.assert_array_equal(np.asarray(item["lr"].convert("RGB")), decode_png(by_id[item["sample_id"]]["lr"]))
    for row in pq.read_table(path).to_pylist():  # the project's own readers take the stored layout
        np.testing.assert_array_equal(decode_rgb(row["hr"]), decode_png(by_id[row["sample_id"]]["hr"]))
        np.testing.assert_array_equal(decode_png(row["lr"]), decode_png(by_id[row["sample_id"]]["lr"]))
