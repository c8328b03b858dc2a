"""jobs/prepare_data.py and pipeline/images.py: issue 3's determinism (1), resume (3) and bad
input (4) acceptance tests, plus the stage functions without Ray."""
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
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
from jobs.common import job_parser
from pipeline import output as out
from pipeline import pairs
from pipeline import pairs_dataset as dataset
from pipeline.degrade import PARAMS_VERSION
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
    with pytest.raises(SystemExit):  # argparse refuses a choice it does not list
        job_parser("prepare-data", P).parse_args(["--input", "x", "--output", "y", "--crop-mode", "center"])


def test_plan_crops():
    random = pairs.plan_crops(100, 130, "a.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert random == pairs.plan_crops(100, 130, "a.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert random != pairs.plan_crops(100, 130, "b.png", patch_size=PATCH, count=5, mode="random", seed=1)
    assert len(random) == 5 and all(0 <= y <= 36 and 0 <= x <= 66 for y, x in random)
    # the first crops do not change when more are asked for
    assert pairs.plan_crops(100, 130, "a.png", patch_size=PATCH, count=2, mode="random", seed=1) == random[:2]
    assert pairs.plan_crops(64, 64, "a.png", patch_size=PATCH, count=3, mode="random", seed=1) == [(0, 0)]
    assert pairs.plan_crops(130, 200, "a.png", patch_size=PATCH, count=9, mode="grid", seed=1) == [
        (0, 0), (0, 64), (0, 128), (64, 0), (64, 64), (64, 128)]
    assert pairs.plan_crops(63, 200, "a.png", patch_size=PATCH, count=1, mode="grid", seed=1) == []
    with pytest.raises(ValueError, match="unknown crop mode"):
        pairs.plan_crops(100, 100, "a.png", patch_size=PATCH, count=1, mode="center", seed=1)


def test_process_source_rows(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "unused", crops_per_image=3)
    rgb = rgb_image("chelsea")
    rows, error = pairs.process_source("mem://chelsea.png", png_bytes(rgb, format="PNG"), cfg)
    assert error is None and len(rows) == 3
    for row in rows:
        hr, lr = decode_png(row["hr"]), decode_png(row["lr"])
        crop = json.loads(row["crop"])
        assert hr.shape == (PATCH, PATCH, 3) and lr.shape == (PATCH // 4, PATCH // 4, 3)
        assert np.array_equal(hr, rgb[crop["y"]:crop["y"] + PATCH, crop["x"]:crop["x"] + PATCH])
        assert json.loads(row["degradation"])["scale"] == 4 and row["seed"] == cfg.seed
    from pipeline.shards import conform_pairs

    table = conform_pairs(pairs.pairs_table(rows))
    assert table.schema.equals(PAIR_SCHEMA) and table.column("caption_model").to_pylist() == [""] * 3
    skipped, _ = pairs.process_source("mem://chelsea.png", png_bytes(rgb, format="PNG"), cfg,
                                  skip_ids=[rows[0]["sample_id"]])
    assert [r["sample_id"] for r in skipped] == [r["sample_id"] for r in rows[1:]]
    assert pairs.process_source("x.png", b"junk", cfg) == ([], pairs.error_row(
        "x.png", "decode", "x.png: not a recognised image format"))


def test_write_shards_cuts_a_tasks_pairs_into_shards_of_shard_rows(tmp_path):
    """A task's unit tables of 3, 0, 9 and 1 rows with shard_rows 4: shards of 4, 4, 4 and a
    last one of 1, holding every row once in order; a second pass (a retried task) writes the
    same files again, not new ones."""
    from pipeline.caption import CaptionConfig, caption_table
    from pipeline.shards import SHARD_SCHEMA, write_shards

    cfg = make_cfg(tmp_path, tmp_path, "unused", crops_per_image=13, patch_size=16)
    rows, _ = pairs.process_source("mem://chelsea.png", png_bytes(rgb_image("chelsea"), format="PNG"), cfg)
    ids = [r["sample_id"] for r in rows]
    assert len(set(ids)) == 13
    sizes, start, tables = (3, 0, 9, 1), 0, []
    for size in sizes:
        tables.append(caption_table(pairs.pairs_table(rows[start:start + size]), CaptionConfig(backend="template")))
        start += size
    output = str(tmp_path / "out")
    written = [t.to_pylist() for t in write_shards(iter(tables), output, PARAMS_VERSION, shard_rows=4)]
    assert all(len(w) == 1 for w in written) and [w[0]["rows"] for w in written] == [4, 4, 4, 1]
    shards = [pq.read_table(str(Path(output) / w[0]["shard"])) for w in written]
    assert [s for t in shards for s in t.column("sample_id").to_pylist()] == ids
    assert all(t.schema.equals(PAIR_SCHEMA) for t in shards)
    template = CaptionConfig(backend="template")
    assert {m for t in shards for m in t.column("caption_model").to_pylist()} == {template.caption_model}
    again = [t.to_pylist()[0]["shard"] for t in write_shards(iter(tables), output, PARAMS_VERSION, 4)]
    assert again == [w[0]["shard"] for w in written]
    assert len(list((Path(output) / P.SHARDS_DIR).iterdir())) == 4
    assert list(write_shards(iter([tables[1]]), output, PARAMS_VERSION, 4)) == []  # nothing, no shard
    with pytest.raises(ValueError, match="shard_rows"):
        list(write_shards(iter(tables), output, PARAMS_VERSION, 0))
    assert SHARD_SCHEMA.names == ["shard", "rows"]


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
    # file:// names local files (pipeline.inputs, the listing every job shares); hidden files are
    # skipped, other files come with the reason they are not read
    uris = ["file://" + p for p in paths]
    listed = dict(P.iter_listing("file://" + str(tmp_path / "in")))
    assert sorted(listed) == sorted(paths + [str(tmp_path / "in" / "README.txt")])
    assert listed[str(tmp_path / "in" / "README.txt")].startswith("unsupported file type (.txt)")
    assert P.list_sources("file://" + str(tmp_path / "in" / "sub" / "*_00.png")) == paths[:1]
    assert P.read_bytes(uris[0]) == Path(paths[0]).read_bytes()


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """A rerun with another seed or captioner is refused in one line, exit 2, before any work."""
    cfg = make_cfg(tmp_path, tmp_path, "out")
    fs, root = P.resolve_fs(cfg.output)
    fs.create_dir(root)
    assert not out.check_run_record(fs, root, cfg.record(), label=cfg.output)
    assert out.check_run_record(fs, root, cfg.record(), label=cfg.output)  # same settings: fine
    moved = make_cfg(tmp_path, tmp_path / "elsewhere", "out")  # another input path: content ids decide
    assert out.check_run_record(fs, root, moved.record(), label=cfg.output)
    with pytest.raises(out.RunMismatch, match="seed"):
        out.check_run_record(fs, root, make_cfg(tmp_path, tmp_path, "out", seed=1).record(), label="o")
    base = ["--input", str(tmp_path), "--output", cfg.output, "--patch-size", str(PATCH),
            "--crops-per-image", "2", "--shard-rows", "3"]
    code = P.main(base + ["--captioner", "template"])
    err = capsys.readouterr().err
    assert code == 2 and "captioner: 'off' -> 'template'" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and not (Path(cfg.output) / P.SHARDS_DIR).exists()


# ---------------------------------------------------------------------------------------------
# The Ray Data job
# ---------------------------------------------------------------------------------------------

def by_sample_id(table: pa.Table) -> dict:
    """{sample_id: (LR PNG, degradation, HR PNG)} of pair rows, as stages pass them or as shards store them."""
    from pipeline.schema import image_bytes

    return {r["sample_id"]: (image_bytes(r["lr"]), r["degradation"], image_bytes(r["hr"]))
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
    manifest = json.loads((Path(one.output) / dataset.MANIFEST_FILE).read_text())
    assert manifest["total_rows"] == 8 and all(s["rows"] <= 2 for s in manifest["shards"])
    # the per-batch stage, called without Ray, gives the same bytes
    items = pa.Table.from_pylist([{"source_uri": s, "reject": None} for s in P.list_sources(str(input_dir))])
    bare = dataset.degrade_batch(items, asdict(one), P.READER)
    assert by_sample_id(bare) == by_sample_id(pairs_one)


def test_bad_input_folder(tmp_path, ray_local):
    """Issue 3, acceptance 4: one handled-or-error record per file, and every good pair."""
    input_dir = tmp_path / "odd"
    input_dir.mkdir()
    files = odd_files()
    for name, (payload, _) in files.items():
        (input_dir / name).write_bytes(payload)
    (input_dir / "notes.txt").write_text("not an image extension")
    cfg = make_cfg(tmp_path, input_dir, "out", captioner="template")
    parsed = P.config_from_args(job_parser("prepare-data", P).parse_args(
        ["--input", cfg.input, "--output", cfg.output, "--patch-size", str(PATCH), "--crops-per-image", "2",
         "--shard-rows", "3", "--captioner", "template"]))
    summary = P.prepare(parsed)
    pairs = read_pairs(cfg.output)
    errors = pq.read_table(os.path.join(cfg.output, dataset.ERRORS_FILE))
    assert errors.schema.equals(ERROR_SCHEMA)
    error_stage = {Path(r["source_uri"]).name: r for r in errors.to_pylist()}
    converted = {}
    for row in pairs.select(["source_uri", "conversion"]).to_pylist():
        converted.setdefault(Path(row["source_uri"]).name, set()).add(row["conversion"])
    assert summary["sources"] == len(files) + 1 and not (set(converted) & set(error_stage))
    assert error_stage["notes.txt"]["stage"] == "unsupported"  # recorded with its reason, not dropped
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
    import threading, time
    from pathlib import Path
    shards = Path({cfg!r}["output"]) / "shards"
    def kill_after_shards(count):  # the degrade tasks write the shards: watch them land
        while len(list(shards.glob("part-*.parquet"))) < count:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill of the job, mid-run
    threading.Thread(target=kill_after_shards, args=({kill_after},), daemon=True).start()
    prepare(PrepareConfig(**{cfg!r}))
""")


def test_resume_after_kill(tmp_path, ray_local, run_until_killed):
    """SIGKILL the job part-way, rerun through a moved (symlinked) path to the same folder: the
    killed run's lease is taken over, each sample_id is written exactly once (content ids), no
    partial file remains and the manifest lists every shard."""
    input_dir = tmp_path / "in[1]"  # a literal folder name with glob characters
    write_good_images(input_dir, 8)
    cfg = make_cfg(tmp_path, input_dir, "out", shard_rows=2, files_per_task=1)
    script = KILL_SCRIPT.format(kill_after=1, cfg=asdict(cfg))
    shards_dir = Path(cfg.output) / P.SHARDS_DIR
    proc = run_until_killed([sys.executable, "-c", script], lambda: sorted(shards_dir.glob("*")), cwd=REPO,
                            timeout=240, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (Path(cfg.output) / out.LEASE_FILE).exists()  # left by the killed run: stale
    finished = sorted(shards_dir.glob("part-*.parquet"))
    assert not (Path(cfg.output) / dataset.MANIFEST_FILE).exists()
    assert 1 <= len(finished) < 8, "the run was not interrupted part-way"
    # what a writer killed mid-file leaves: readers and the rerun must ignore it
    (shards_dir / f"{out.TMP_PREFIX}0123-part-partial.parquet").write_bytes(b"PAR1 truncated")
    before = read_pairs(cfg.output).column("sample_id").to_pylist()
    moved = tmp_path / "moved"
    moved.symlink_to(input_dir, target_is_directory=True)

    summary = P.prepare(dataclasses.replace(cfg, input=str(moved)))
    ids = read_pairs(cfg.output).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 16 and set(before) <= set(ids)
    assert summary["pairs_written"] == 16 - len(before) and summary["total_pairs"] == 16
    assert not list(shards_dir.glob(out.TMP_PREFIX + "*"))
    manifest = json.loads((Path(cfg.output) / dataset.MANIFEST_FILE).read_text())
    assert manifest["total_rows"] == 16 and sorted(s["path"] for s in manifest["shards"]) == sorted(
        f"{P.SHARDS_DIR}/{p.name}" for p in shards_dir.glob("part-*.parquet"))
    again = P.prepare(cfg)  # nothing left to do
    assert again["pairs_written"] == 0 and again["total_pairs"] == 16


# ---------------------------------------------------------------------------------------------
# Safe inputs, content identity, one writer per output
# ---------------------------------------------------------------------------------------------

def test_listing_is_loop_safe_literal_and_reports_unsupported(tmp_path):
    root = tmp_path / "photos[2024]"
    good = write_good_images(root / "sub", 2)
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)  # loop through the parent
    (root / "self").symlink_to(".", target_is_directory=True)  # loop onto itself
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)  # a real dir seen twice
    (root / "notes.txt").write_text("x")
    (root / ".hidden.png").write_bytes(b"")
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").symlink_to("/dev/zero")
    decoy = write_good_images(tmp_path / "photos2", 1)  # what the glob "photos[2024]" matches

    listed = list(P.iter_listing(str(root)))  # a literal path that exists is never a glob
    expected = {**{p: None for p in good}, str(root / "fifo.png"): None, str(root / "zero.png"): None,
                str(root / "notes.txt"): "unsupported file type (.txt)"}
    real = lambda p: p if p.endswith("zero.png") else os.path.realpath(p)  # noqa: E731
    reason = lambda r: r and r.split(";")[0]  # noqa: E731  (the reason, without the list of image types)
    assert len(listed) == len(expected)
    assert {real(p): reason(r) for p, r in listed} == {real(p): r for p, r in expected.items()}
    assert P.list_sources(str(root), as_glob=True) == decoy  # --glob reads it as a pattern
    with pytest.raises(FileNotFoundError, match="no path matches"):
        P.list_sources(str(tmp_path / "nothing-*"))


def test_special_and_oversized_files_are_error_rows(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    rgb = rgb_image("coffee")
    (folder / "ok.png").write_bytes(png_bytes(rgb, format="PNG"))
    # a PNG header claiming 9000 x 9000 pixels and no image data: refused from the header,
    # before a decode (which would report "corrupt or truncated" instead)
    ihdr = b"IHDR" + (9000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = b"IDAT" + b"\x00" * 16  # not a valid zlib stream
    bomb = b"".join([b"\x89PNG\r\n\x1a\n", (13).to_bytes(4, "big"), ihdr, zlib.crc32(ihdr).to_bytes(4, "big"),
                     (16).to_bytes(4, "big"), idat, zlib.crc32(idat).to_bytes(4, "big")])
    with pytest.raises(ImageDecodeError, match="corrupt"):
        load_image(bomb)
    (folder / "bomb.png").write_bytes(bomb)
    cfg = make_cfg(tmp_path, folder, "out", max_bytes=len(png_bytes(rgb, format="PNG")) - 1)
    signal.alarm(20)  # a FIFO must never block the read
    try:
        results = {name: pairs.process_uri(str(folder / name), cfg, P.READER) for name in os.listdir(folder)}
    finally:
        signal.alarm(0)
    assert results["fifo.png"] == ([], pairs.error_row(str(folder / "fifo.png"), "read", "not a regular file (FIFO)"))
    assert results["zero.png"][1]["error"] == "not a regular file (character device)"
    assert results["ok.png"][1]["error"].startswith("file too large")
    assert results["bomb.png"][1] == pairs.error_row(str(folder / "bomb.png"), "limit",
                                                 "too many pixels: the header declares 9000x9000 = 81000000 pixels, "
                                                 "over the cap of 40000000 (--max-pixels)")
    small = dataclasses.replace(cfg, max_bytes=pairs.DEFAULT_MAX_BYTES, max_pixels=rgb.shape[0] * rgb.shape[1] - 1)
    assert pairs.process_uri(str(folder / "ok.png"), small, P.READER)[1]["stage"] == "limit"
    rows, error = pairs.process_uri(str(folder / "ok.png"), dataclasses.replace(small, max_pixels=10**8), P.READER)
    assert error is None and len(rows) == 2


def test_sample_id_comes_from_content_not_path(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "unused")
    data = png_bytes(rgb_image("astronaut"), format="PNG")
    a, _ = pairs.process_source("/data/a.png", data, cfg)
    b, _ = pairs.process_source("s3://bucket/renamed/b.png", data, cfg)
    digest = hashlib.sha256(data).hexdigest()
    assert [r["sample_id"] for r in a] == [hashlib.sha1(f"{digest}|{i}".encode()).hexdigest()[:16]
                                           for i in range(2)]
    assert [(r["sample_id"], r["hr"], r["lr"], r["crop"]) for r in a] == [
        (r["sample_id"], r["hr"], r["lr"], r["crop"]) for r in b]
    other, _ = pairs.process_source("/data/a.png", png_bytes(rgb_image("chelsea"), format="PNG"), cfg)
    assert not {r["sample_id"] for r in other} & {r["sample_id"] for r in a}


CONCURRENT_SCRIPT = textwrap.dedent("""
    import os, time
    import ray
    from jobs.prepare_data import PrepareConfig, prepare
    ray.init(address="local", num_cpus=1, object_store_memory=1 << 29, include_dashboard=False,
             log_to_driver=False)
    def on_shard(row):  # hold the output until the second run has tried
        open({started!r}, "w").close()
        while not os.path.exists({release!r}):
            time.sleep(0.1)
    prepare(PrepareConfig(**{cfg!r}), on_shard=on_shard)
""")


def test_second_concurrent_run_refuses(tmp_path):
    input_dir = tmp_path / "in"
    write_good_images(input_dir, 3)
    cfg = make_cfg(tmp_path, input_dir, "out", shard_rows=2, files_per_task=1)
    started, release = tmp_path / "started", tmp_path / "release"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT.format(
        cfg=asdict(cfg), started=str(started), release=str(release))], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not started.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert started.exists(), first.communicate()[1][-3000:]
        second = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--input", str(input_dir),
                                 "--output", cfg.output, "--patch-size", str(PATCH), "--crops-per-image", "2",
                                 "--shard-rows", "2", "--files-per-task", "1"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another run" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1  # one line, no traceback
    finally:
        release.touch()
    assert first.wait(timeout=180) == 0, first.communicate()[1][-3000:]
    ids = read_pairs(cfg.output).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6
    assert not (Path(cfg.output) / out.LEASE_FILE).exists()
