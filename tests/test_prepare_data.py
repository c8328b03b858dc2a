"""jobs/prepare_data.py and pipeline/images.py: issue 3's determinism (1), resume (3) and bad
input (4) acceptance tests, plus the stage functions without Ray."""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from skimage import data

from jobs import prepare_data as P
from pipeline.images import ImageDecodeError, apply_orientation, load_image, to_rgb8
from pipeline.schema import ERROR_SCHEMA, PAIR_SCHEMA, decode_png

PATCH = 64
REPO = Path(__file__).resolve().parents[1]


def rgb_image(name: str, height: int = 96, width: int = 128) -> np.ndarray:
    image = getattr(data, name)()
    return np.ascontiguousarray(image[:height, :width])


def png_bytes(image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, **save_kwargs)
    return buf.getvalue()


def write_good_images(folder: Path, count: int) -> list:
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = rgb_image(names[i % len(names)], 96 + 8 * (i // len(names)), 128)
        path = folder / f"good_{i:02d}.png"
        path.write_bytes(png_bytes(image, format="PNG"))
        paths.append(str(path))
    return paths


def odd_files() -> dict:
    """name -> (bytes, expected): expected is the conversion text, or the error stage."""
    rgb = rgb_image("coffee")
    alpha = np.dstack([rgb, np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))])
    ok16, rgb16 = cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))
    jpeg = png_bytes(rgb, format="JPEG", quality=90)
    return {
        "plain.png": (png_bytes(rgb, format="PNG"), ""),
        "gray.png": (png_bytes(rgb[..., 0], format="PNG"), "gray -> RGB"),
        "palette.png": (png_bytes(Image.fromarray(rgb).convert("P"), format="PNG"), "mode P -> RGB"),
        "alpha.png": (png_bytes(alpha, format="PNG"), "alpha composited on white"),
        "cmyk.jpg": (png_bytes(Image.fromarray(rgb).convert("CMYK"), format="JPEG"), "mode CMYK -> RGB"),
        "rgb16.png": (rgb16.tobytes(), "16-bit -> 8-bit"),
        "undecodable.jpg": (b"this is not an image" * 20, "decode"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode"),
        "empty.png": (b"", "decode"),
        "too_small.png": (png_bytes(rgb[:PATCH - 1, :PATCH + 8], format="PNG"), "crop"),
    }


def make_cfg(tmp_path: Path, input_dir: Path, name: str, **overrides) -> P.PrepareConfig:
    settings = dict(input=str(input_dir), output=str(tmp_path / name), patch_size=PATCH,
                    crops_per_image=2, shard_rows=3, files_per_task=2)
    return P.PrepareConfig(**{**settings, **overrides})


def read_pairs(output: str) -> pa.Table:
    return pq.read_table(os.path.join(output, P.SHARDS_DIR))


# ---------------------------------------------------------------------------------------------
# pipeline/images.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(odd_files()))
def test_load_image_handles_or_rejects_each_kind(name):
    payload, expected = odd_files()[name]
    if expected == "decode":
        with pytest.raises(ImageDecodeError, match=name):
            load_image(payload, name)
        return
    rgb, conversion = to_rgb8(load_image(payload, name))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    if expected != "crop":  # too small decodes fine; the crop stage rejects it
        assert expected in conversion and (conversion == "") == (expected == "")


def test_load_image_keeps_source_format():
    rgb = rgb_image("coffee", 20, 30)
    gray16 = (rgb[..., 0].astype(np.uint16) * 257)
    _, buf = cv2.imencode(".png", gray16)
    img = load_image(buf.tobytes())
    assert img.pixels.dtype == np.uint16 and img.bit_depth == 16 and img.pixels.shape == (20, 30)
    out, conversion = to_rgb8(img)
    assert np.array_equal(out[..., 1], rgb[..., 0]) and conversion == "16-bit -> 8-bit; gray -> RGB"
    rgba = load_image(png_bytes(np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), format="PNG"))
    assert rgba.has_alpha and rgba.mode == "RGBA" and rgba.pixels.shape == (20, 30, 4)
    out, conversion = to_rgb8(rgba)
    assert np.array_equal(out, rgb) and conversion == "opaque alpha dropped"


def test_alpha_modes():
    rgb = np.zeros((4, 4, 3), np.uint8)
    transparent = load_image(png_bytes(np.dstack([rgb, np.zeros((4, 4), np.uint8)]), format="PNG"))
    white, note = to_rgb8(transparent)
    assert (white == 255).all() and note == "alpha composited on white"
    dropped, note = to_rgb8(transparent, alpha="drop")
    assert (dropped == 0).all() and note == "alpha dropped"
    with pytest.raises(ValueError, match="unknown alpha mode"):
        to_rgb8(transparent, alpha="black")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    rgb = rgb_image("astronaut", 12, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = png_bytes(rgb, format="PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))))
    img = load_image(payload)
    assert img.orientation == orientation
    assert np.array_equal(img.pixels, expected)
    assert np.array_equal(apply_orientation(rgb, orientation), expected)


# ---------------------------------------------------------------------------------------------
# Stage functions without Ray
# ---------------------------------------------------------------------------------------------

def test_config_rejects_bad_arguments():
    base = dict(input="in", output="out")
    for bad, match in ((dict(crop_mode="center"), "unknown crop mode"),
                       (dict(captioner="blip"), "unknown captioner"),
                       (dict(alpha="black"), "unknown alpha mode"),
                       (dict(patch_size=66), "divisible"),
                       (dict(crops_per_image=0), "crops_per_image"),
                       (dict(shard_rows=0), "shard_rows"),
                       (dict(seed=-1), "seed"),
                       (dict(num_workers=0), "num_workers")):
        with pytest.raises(ValueError, match=match):
            P.PrepareConfig(**base, **bad)
    with pytest.raises(SystemExit):
        P.parse_args(["--input", "x", "--output", "y", "--crop-mode", "center"])


def test_plan_crops():
    random = P.plan_crops(100, 130, "a.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert random == P.plan_crops(100, 130, "a.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert random != P.plan_crops(100, 130, "b.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert len(random) == 5 and all(0 <= y <= 36 and 0 <= x <= 66 for y, x in random)
    # the first crops do not change when more are asked for
    assert P.plan_crops(100, 130, "a.png", patch_size=PATCH, count=2, mode="random", seed=1) == random[:2]
    assert P.plan_crops(64, 64, "a.png", patch_size=PATCH, count=3, mode="random", seed=1) == [(0, 0)]
    assert P.plan_crops(130, 200, "a.png", patch_size=PATCH, count=9, mode="grid", seed=1) == [
        (0, 0), (0, 64), (0, 128), (64, 0), (64, 64), (64, 128)]
    assert P.plan_crops(63, 200, "a.png", patch_size=PATCH, count=1, mode="grid", seed=1) == []
    with pytest.raises(ValueError, match="unknown crop mode"):
        P.plan_crops(100, 100, "a.png", patch_size=PATCH, count=1, mode="center", seed=1)


def test_process_source_rows(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "unused", crops_per_image=3)
    rgb = rgb_image("chelsea")
    rows, error = P.process_source("mem://chelsea.png", png_bytes(rgb, format="PNG"), cfg)
    assert error is None and len(rows) == 3
    for row in rows:
        hr, lr = decode_png(row["hr"]), decode_png(row["lr"])
        crop = json.loads(row["crop"])
        assert hr.shape == (PATCH, PATCH, 3) and lr.shape == (PATCH // 4, PATCH // 4, 3)
        assert np.array_equal(hr, rgb[crop["y"]:crop["y"] + PATCH, crop["x"]:crop["x"] + PATCH])
        assert json.loads(row["degradation"])["scale"] == 4 and row["seed"] == cfg.seed
    table = P.conform_pairs(P.pairs_table(rows))
    assert table.schema.equals(PAIR_SCHEMA) and table.column("caption_model").to_pylist() == [""] * 3
    skipped, _ = P.process_source("mem://chelsea.png", png_bytes(rgb, format="PNG"), cfg,
                                  skip_ids=[rows[0]["sample_id"]])
    assert [r["sample_id"] for r in skipped] == [r["sample_id"] for r in rows[1:]]
    assert P.process_source("x.png", b"junk", cfg) == ([], P.error_row(
        "x.png", "decode", "x.png: not a recognised image format"))


def test_list_sources(tmp_path):
    paths = write_good_images(tmp_path / "in" / "sub", 2)
    (tmp_path / "in" / "README.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    assert P.list_sources(str(tmp_path / "in")) == paths
    assert P.list_sources(str(tmp_path / "in" / "**" / "*_01.png")) == paths[1:]
    assert P.list_sources(paths[0]) == paths[:1]
    assert P.list_sources("file://" + str(tmp_path / "in")) == paths
    with pytest.raises(FileNotFoundError):
        P.list_sources(str(tmp_path / "missing"))
    # the URI path (s3://, gs://, ...) through pyarrow's filesystem, here with file://
    uris = ["file://" + p for p in paths]
    assert sorted(P._list_remote("file://" + str(tmp_path / "in"))) == sorted(
        uris + ["file://" + str(tmp_path / "in" / n) for n in ("README.txt", ".hidden.png")])
    assert P._list_remote("file://" + str(tmp_path / "in" / "sub" / "*_00.png")) == uris[:1]
    assert P.read_bytes(uris[0]) == Path(paths[0]).read_bytes()


def test_captions_left_empty_without_caption_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.caption", None)  # import now raises ImportError
    sentinel = object()
    assert P.add_captions(sentinel, "template") is sentinel


def test_rerun_with_other_settings_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "out")
    fs, root = P.resolve_fs(cfg.output)
    fs.create_dir(root)
    P.check_run_config(fs, root, cfg)
    P.check_run_config(fs, root, cfg)  # same settings: fine
    with pytest.raises(ValueError, match="seed"):
        P.check_run_config(fs, root, make_cfg(tmp_path, tmp_path, "out", seed=1))


# ---------------------------------------------------------------------------------------------
# The Ray Data job
# ---------------------------------------------------------------------------------------------

def by_sample_id(table: pa.Table) -> dict:
    return {r["sample_id"]: (r["lr"], r["degradation"], r["hr"])
            for r in table.select(["sample_id", "lr", "degradation", "hr"]).to_pylist()}


def test_determinism_across_workers_and_batch_sizes(tmp_path, ray_local):
    """Issue 3, acceptance 1: byte-identical LR and params per sample_id for 1 or 2 workers."""
    input_dir = tmp_path / "in"
    write_good_images(input_dir, 4)
    one = make_cfg(tmp_path, input_dir, "one", num_workers=1, files_per_task=1, shard_rows=2)
    two = make_cfg(tmp_path, input_dir, "two", num_workers=2, files_per_task=3, shard_rows=5)
    summary_one, summary_two = P.prepare(one), P.prepare(two)
    assert summary_one["pairs_written"] == summary_two["pairs_written"] == 8
    pairs_one, pairs_two = read_pairs(one.output), read_pairs(two.output)
    assert pairs_one.schema.equals(PAIR_SCHEMA)
    assert by_sample_id(pairs_one) == by_sample_id(pairs_two)
    manifest = json.loads((Path(one.output) / P.MANIFEST_FILE).read_text())
    assert manifest["total_rows"] == 8 and all(s["rows"] <= 2 for s in manifest["shards"])
    # the per-batch stage, called without Ray, gives the same bytes
    items = pa.Table.from_pylist([{"source_uri": s, "done_ids": []} for s in P.list_sources(str(input_dir))])
    bare = P.degrade_batch(items, asdict(one))
    assert by_sample_id(bare) == by_sample_id(pairs_one)


def test_bad_input_folder(tmp_path, ray_local):
    """Issue 3, acceptance 4: one handled-or-error record per file, and every good pair."""
    input_dir = tmp_path / "odd"
    input_dir.mkdir()
    files = odd_files()
    for name, (payload, _) in files.items():
        (input_dir / name).write_bytes(payload)
    (input_dir / "notes.txt").write_text("ignored: not an image extension")
    cfg = make_cfg(tmp_path, input_dir, "out", captioner="template")
    summary = P.main(["--input", cfg.input, "--output", cfg.output, "--patch-size", str(PATCH),
                      "--crops-per-image", "2", "--shard-rows", "3", "--captioner", "template"])
    pairs = read_pairs(cfg.output)
    errors = pq.read_table(os.path.join(cfg.output, P.ERRORS_FILE))
    assert errors.schema.equals(ERROR_SCHEMA)
    error_stage = {Path(r["source_uri"]).name: r for r in errors.to_pylist()}
    converted = {}
    for row in pairs.select(["source_uri", "conversion"]).to_pylist():
        converted.setdefault(Path(row["source_uri"]).name, set()).add(row["conversion"])
    assert summary["sources"] == len(files) and not (set(converted) & set(error_stage))
    for name, (_, expected) in files.items():
        if expected in ("decode", "crop"):
            assert error_stage[name]["stage"] == expected and error_stage[name]["error"]
        else:
            assert converted[name] == {expected}, name
    assert error_stage["too_small.png"]["error"].startswith("too small")
    assert pairs.num_rows == 2 * sum(e not in ("decode", "crop") for _, e in files.values())
    assert all(pairs.column("hr_caption").to_pylist()) and all(pairs.column("lr_caption").to_pylist())
    assert set(pairs.column("caption_model").to_pylist()) == {"template"}


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import ray
    from jobs.prepare_data import PrepareConfig, prepare
    ray.init(address="local", num_cpus=1, object_store_memory=1 << 29, include_dashboard=False,
             log_to_driver=False)
    written = []
    def on_shard(row):
        written.append(row)
        if len(written) == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, mid-run
    prepare(PrepareConfig(**{cfg!r}), on_shard=on_shard)
""")


def test_resume_after_kill(tmp_path, ray_local):
    """Issue 3, acceptance 3: kill the job part-way, rerun, each sample_id exactly once."""
    input_dir = tmp_path / "in"
    write_good_images(input_dir, 8)
    cfg = make_cfg(tmp_path, input_dir, "out", shard_rows=2, files_per_task=1)
    script = KILL_SCRIPT.format(kill_after=1, cfg=asdict(cfg))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    shards_dir = Path(cfg.output) / P.SHARDS_DIR
    finished = sorted(shards_dir.glob("part-*.parquet"))
    assert not (Path(cfg.output) / P.MANIFEST_FILE).exists()
    assert 1 <= len(finished) < 8, "the run was not interrupted part-way"
    # what a writer killed mid-file leaves: readers and the rerun must ignore it
    (shards_dir / f"{P.TMP_PREFIX}0123-part-partial.parquet").write_bytes(b"PAR1 truncated")
    before = read_pairs(cfg.output).column("sample_id").to_pylist()

    summary = P.prepare(cfg)
    ids = read_pairs(cfg.output).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 16 and set(before) <= set(ids)
    assert summary["pairs_written"] == 16 - len(before) and summary["total_pairs"] == 16
    assert not list(shards_dir.glob(P.TMP_PREFIX + "*"))
    again = P.prepare(cfg)  # nothing left to do
    assert again["pairs_written"] == 0 and again["skipped_sources"] == 8
