"""Bulk upscaling at corpus scale: safe inputs, safe outputs, bounded memory, exit codes, and the
evaluation report's escaping. One test (or a few) per promise; each runs without Ray except the
exit-code test."""
from __future__ import annotations

import io
import math
import os
import struct
import threading
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flowsr import color

from flowsr import sample as S

from flowsr import tiling as T
from flowsr import upscaler as U
from pipeline import image_codecs, images, naming
from pipeline import inputs as pipeline_inputs
from pipeline import upscale_stages as stages


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage(pixel_ckpt):
    return stages.UpscaleStage(pixel_ckpt, scale=2, tile=None, vae_tile=None, color_fix="none")


@pytest.fixture(scope="module")
def backbone(pixel_ckpt):
    from flowsr.checkpoint import load_for_inference

    return load_for_inference(pixel_ckpt)[0]


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x * y) % 255], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _png(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _within(seconds, fn):
    """fn() run in a daemon thread; fails (instead of hanging the suite) when it takes more than
    `seconds` — a reader blocked on a named pipe is left blocked there."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 — re-raised below
            result["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _run(stage, rows, output_root, **probe):
    """plan rows -> probe -> decode -> upscale -> write, without Ray (the job's stages in order)."""
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    probed = stages.probe_batch(batch, scale=stage.upscaler.options["scale"], **probe)
    return stages.write_batch(stage(stages.decode_batch(probed)), output_root=output_root)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---- safe inputs ----------------------------------------------------------------------------------
def test_pipes_and_devices_are_error_rows_and_never_hang(stage, tmp_path):
    root = tmp_path / "in"
    _png(root / "good.png", _rgb(8, 8))
    os.mkfifo(root / "pipe.png")
    os.symlink("/dev/zero", root / "zero.png")
    rows = _within(30, lambda: naming.plan_outputs(pipeline_inputs.scan_inputs(str(root)), str(tmp_path / "out"),
                                                   "same"))
    out = _within(60, lambda: _run(stage, rows, str(tmp_path / "out")))
    # a Parquet list naming them explicitly is probed, and refused there
    pq.write_table(pa.table({"path": [str(root / "pipe.png"), str(root / "zero.png")]}), tmp_path / "l.parquet")
    listed = naming.plan_outputs(pipeline_inputs.scan_inputs(str(tmp_path / "l.parquet")), str(tmp_path / "out2"),
                                 "same")
    probed = _within(30, lambda: stages.probe_batch({k: [r[k] for r in listed] for k in listed[0]}, scale=2))
    status = dict(zip(out["input"], zip(out["status"], out["error"])))
    assert status[str(root / "good.png")] == ("ok", "")
    for name, kind in (("pipe.png", "named pipe"), ("zero.png", "character device")):
        assert status[str(root / name)][0] == "error" and kind in status[str(root / name)][1]
    assert probed["status"] == ["error", "error"]
    assert "named pipe" in probed["error"][0] and "character device" in probed["error"][1]
    assert _files(tmp_path / "out") == ["good.png"]


def test_symlink_loops_end_and_each_real_folder_is_listed_once(tmp_path):
    root = tmp_path / "in"
    _png(root / "a.png", _rgb(4, 4))
    _png(root / "sub" / "b.png", _rgb(4, 4))
    _png(tmp_path / "elsewhere" / "c.png", _rgb(4, 4))
    os.symlink("..", root / "sub" / "up")
    os.symlink(".", root / "self")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(tmp_path / "elsewhere", root / "sub" / "again")  # a second link to the same folder
    listed = _within(30, lambda: pipeline_inputs.list_inputs(str(root)))
    assert [rel for _, rel in listed] == ["a.png", "linked/c.png", "sub/b.png"]


def test_a_literal_path_that_exists_is_never_globbed(tmp_path):
    folder = tmp_path / "photos[2024]"
    _png(folder / "x.png", _rgb(4, 4))
    _png(tmp_path / "photos2" / "decoy.png", _rgb(4, 4))  # what the glob photos[2024] would match
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(folder))] == ["x.png"]
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(folder / "*.png"))] == ["x.png"]  # a glob under it
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(tmp_path / "photos[2024]" / "x.png"))] == ["x.png"]
    for name in ("q[12].png", "q1.png", "q2.png"):
        _png(tmp_path / "qs" / name, _rgb(4, 4))
    assert [rel for _, rel in pipeline_inputs.list_inputs(str(tmp_path / "qs" / "q[12].png"))] == ["q[12].png"]
    globbed = pipeline_inputs.list_inputs(str(tmp_path / "qs" / "q[12].png"), glob=True)
    assert [rel for _, rel in globbed] == ["q1.png", "q2.png"]
    with pytest.raises(FileNotFoundError):
        pipeline_inputs.list_inputs(str(tmp_path / "missing"))


def test_other_image_formats_are_read_and_other_files_are_listed_with_a_reason(stage, tmp_path):
    root = tmp_path / "in"
    image = _rgb(10, 12)
    _png(root / "a.gif", image)
    _png(root / "b.ppm", image)
    _png(root / "c.pgm", image[..., 0])
    _png(root / "d.jfif", image, format="JPEG")
    (root / "notes.txt").write_text("hello")
    (root / "raw.cr2").write_bytes(b"II*\0")
    scanned = pipeline_inputs.scan_inputs(str(root))
    assert {i.relative: i.status for i in scanned} == {
        "a.gif": "pending", "b.ppm": "pending", "c.pgm": "pending", "d.jfif": "pending",
        "notes.txt": "unsupported", "raw.cr2": "unsupported"}
    assert all(".txt" in i.error or ".cr2" in i.error for i in scanned if i.status == "unsupported")
    rows = naming.plan_outputs(scanned, str(tmp_path / "out"), "same")
    out = _run(stage, rows, str(tmp_path / "out"))
    by_name = {os.path.basename(i): (s, o) for i, s, o in zip(out["input"], out["status"], out["output"])}
    assert by_name["notes.txt"] == ("unsupported", "") and by_name["raw.cr2"] == ("unsupported", "")
    for name in ("a.gif", "b.ppm", "c.pgm", "d.jfif"):
        assert by_name[name][0] == "ok"
        with Image.open(by_name[name][1]) as im:
            assert im.size == (24, 20)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_pixel_and_size_caps_are_per_item_errors_before_decode(tmp_path):
    # a 1 KB PNG whose header claims 13000 x 13000 RGB: decoding it would need 500 MB
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100_000)) + _png_chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(bomb)
    _png(tmp_path / "small.png", _rgb(100, 100))
    batch = {"input": [str(tmp_path / "bomb.png"), str(tmp_path / "small.png"), str(tmp_path / "small.png")],
             "output": [str(tmp_path / "o1.png"), str(tmp_path / "o2.png"), str(tmp_path / "o3.png")]}
    out = stages.probe_batch(batch, scale=4)
    assert out["status"] == ["error", "pending", "pending"]
    assert "input pixel cap" in out["error"][0] and "--max-pixels" in out["error"][0]
    out = stages.probe_batch(batch, scale=4, max_output_pixels=100_000, max_bytes=1 << 20)
    assert out["status"][1] == "error" and "output pixel cap" in out["error"][1]
    out = stages.probe_batch(batch, scale=1, max_bytes=1000)
    assert out["status"][1:] == ["error", "error"] and "file size cap" in out["error"][1]


def test_probe_unit_commits_one_pending_part_and_names_its_bucket(tmp_path):
    """A probe unit's pending rows go to one part whose path and row count come back (the driver
    holds a path per unit, not per input), with their output-size bucket when they share one
    (the job then skips the sort by size) and "mixed" when not."""
    for name, (h, w) in {"a.png": (10, 12), "b.png": (10, 12), "c.png": (30, 12)}.items():
        _png(tmp_path / name, _rgb(h, w))

    def probe(names, tag):
        batch = {"input": [str(tmp_path / n) for n in names], "output": [str(tmp_path / f"{tag}{n}") for n in names]}
        return stages.probe_and_commit(batch, parts_dir=str(tmp_path / "parts"), pending_dir=str(tmp_path / "pending"),
                                    bucket=8, scale=2)
    same = probe(["a.png", "b.png"], "s")
    assert same["pending"] == same["pending_rows"] == [2] and same["pending_bucket"] == ["3x3"]  # 24x20 -> 3x3 of 8
    part = pq.read_table(same["pending_part"][0])
    assert sorted(part.column("input").to_pylist()) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert part.column("bucket_h").to_pylist() == [3, 3] and part.column("bucket_w").to_pylist() == [3, 3]
    assert probe(["a.png", "c.png"], "m")["pending_bucket"] == [stages.MIXED_BUCKETS]  # 20 vs 60 rows
    made_from_a = image_codecs.encode_image(_rgb(20, 24), None, ".png", None,
                                            image_codecs.file_digest(str(tmp_path / "a.png")))
    (tmp_path / "sa.png").write_bytes(made_from_a)  # a valid output of a.png already there: nothing pending
    done = probe(["a.png"], "s")
    assert (done["pending_part"], done["pending_rows"], done["pending_bucket"], done["skipped"]) == ([""], [0], [""], [1])


def test_png_with_exif_after_the_image_data_is_not_redone(stage, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(10, 16)).save(buf, format="PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION_TAG] = 6  # rotate 90 degrees: displayed 10 wide, 16 high
    data = data[:-12] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + data[-12:]  # eXIf right before IEND
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "late.png").write_bytes(data)
    from pipeline.images import load_image

    assert load_image(data).pixels.shape[:2] == (16, 10)  # the decoder applies it
    assert image_codecs.header_size(image_codecs.read_header(str(tmp_path / "in" / "late.png")))[:2] == (16, 10)
    rows = naming.plan_outputs(pipeline_inputs.scan_inputs(str(tmp_path / "in")), str(tmp_path / "out"), "same")
    assert _run(stage, rows, str(tmp_path / "out"))["status"] == ["ok"]
    assert _run(stage, rows, str(tmp_path / "out"))["status"] == ["skipped"]


# ---- safe outputs ---------------------------------------------------------------------------------
def test_a_listed_path_that_climbs_out_never_writes_outside_out(stage, tmp_path):
    _png(tmp_path / "imgs" / "a.png", _rgb(8, 8))
    _png(tmp_path / "src" / "x.png", _rgb(8, 8, 1))
    original = (tmp_path / "src" / "x.png").read_bytes()
    paths = [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs") + "/../src/x.png"]
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    out_root = tmp_path / "out"
    rows = naming.plan_outputs(pipeline_inputs.scan_inputs(str(tmp_path / "list.parquet")), str(out_root), "same")
    result = _run(stage, rows, str(out_root))
    assert result["status"] == ["ok", "ok"]
    assert (tmp_path / "src" / "x.png").read_bytes() == original
    real_out = os.path.realpath(out_root)
    assert all(os.path.realpath(o).startswith(real_out + os.sep) for o in result["output"])
    assert sorted(_files(out_root)) == ["imgs/a.png", "src/x.png"]
    # names that climb out, and a link inside OUT that points elsewhere, are error rows
    (out_root / "escape").symlink_to(tmp_path / "src")
    bad = naming.plan_outputs([("u1", "../up.png"), ("u2", "/abs.png"), ("u3", "escape/x.png"), ("u4", "ok.png")],
                           str(out_root), "same")
    assert [r["status"] for r in bad] == ["error", "error", "error", "pending"]
    assert [r["output"] for r in bad] == ["", "", "", str(out_root / "ok.png")]


def test_colliding_names_get_distinct_outputs_by_a_fixed_rule(stage, tmp_path):
    root = tmp_path / "in"
    for k, name in enumerate(("a.png", "a.jpg", "a.png.png", "A.PNG")):
        _png(root / name, _rgb(8, 8, k), format="PNG" if "png" in name.lower() else "JPEG")
    inputs = pipeline_inputs.scan_inputs(str(root))
    rows = naming.plan_outputs(inputs, str(tmp_path / "out"), "png")
    names = {os.path.basename(r["input"]): os.path.basename(r["output"]) for r in rows}
    # own extension first (A.PNG, a.png, a.png.png, sorted), then the others; a name taken ignoring case
    # moves on to input name + extension
    assert names == {"A.PNG": "A.png", "a.png": "a.png.png", "a.png.png": "a.png.png.png", "a.jpg": "a.jpg.png"}
    result = _run(stage, rows, str(tmp_path / "out"))
    assert result["status"] == ["ok"] * 4
    assert len(_files(tmp_path / "out")) == 4
    # a JPEG target reserves its PNG twin (the name it gets when the image has alpha)
    jpg = naming.plan_outputs([("u1", "b.png"), ("u2", "b.webp")], "/o", "jpg")
    twins = {r["output"] for r in jpg} | {r["output"][:-4] + ".png" for r in jpg}
    assert len(twins) == 4
    # the same inputs in another order get the same names
    assert naming.plan_outputs(list(reversed(inputs)), str(tmp_path / "out"), "png")[::-1] == rows


def test_evaluate_escapes_the_report_and_sanitises_file_names(tmp_path):
    from pipeline.evaluation import EvalConfig, image_path, safe_name
    from pipeline.report import write_report
    from pipeline.schema import encode_png

    evil = '../../x"><script>alert(1)</script>'
    assert safe_name("0a1b2c") == "0a1b2c"
    assert safe_name(evil) != safe_name(evil.replace("<", "_")) and "/" not in safe_name(evil)
    assert not safe_name("..").startswith(".") and safe_name("")
    out = tmp_path / "eval"
    cfg = EvalConfig(data=str(tmp_path / "data"), out=str(out), sr=(("m<b>", str(tmp_path)),), scale=2,
                     crop_size=8, report_images=2)
    for key in ("hr", "lr", "bicubic", "m<b>"):
        size = 4 if key == "lr" else 8
        path = image_path(str(out), key, evil)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(_rgb(size, size)))
    summary = {"dataset": "<i>set</i>", "n_images": 1, "scale": 2, "metrics_order": ["psnr"],
               "methods": [list(m) for m in cfg.methods()], "mean": {"bicubic": {"psnr": 20.0}},
               "unavailable": {"fid": "<no weights>"}}
    page = open(write_report(summary, cfg, [{"sample_id": evil, "bicubic/psnr": 20.0}])).read()
    assert "<script>" not in page and "<i>" not in page and "<b>" not in page and "<no weights>" not in page
    assert "&lt;script&gt;" in page
    real = os.path.realpath(out)
    for d, _, files in os.walk(tmp_path):
        for f in files:
            if f.endswith(".png"):
                assert os.path.realpath(os.path.join(d, f)).startswith(real + os.sep)
    assert len(os.listdir(out / "report")) == 4


# ---- bounded memory -------------------------------------------------------------------------------
def _gauss(n):
    x = np.arange(n, dtype=np.float64)
    return np.exp(-0.5 * ((x - (n - 1) / 2) / (T.GAUSSIAN_TILE_SIGMA * n)) ** 2)


def test_one_tile_equals_a_direct_whole_image_forward(backbone):
    lr = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(0)) * 2 - 1
    H, W = 33, 39
    lr_up = S.resize_to(lr, (H, W))
    whole = S.super_resolve(backbone, T.pad_to(lr_up, (34, 40)))[..., :H, :W]  # padded to the size multiple 2
    for fix in ("none", "wavelet", "adain"):
        got = S.upscale(backbone, lr, 3, tile=64, tile_overlap=8, vae_tile=64, color_fix=fix)
        want = color.color_correct(whole, lr_up, fix)
        assert (got - want).abs().max() < (2e-3 if fix == "adain" else 1e-5), fix  # adain keeps rows in fp16


def test_many_tiles_equal_a_float64_blend_of_tile_forwards(backbone):
    lr = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(1)) * 2 - 1
    H, W, tile, overlap = 120, 90, 32, 8
    lr_up = S.resize_to(lr, (H, W))
    num, den = torch.zeros(1, 3, H, W, dtype=torch.float64), torch.zeros(1, 1, H, W, dtype=torch.float64)
    weight = torch.from_numpy(np.outer(_gauss(tile), _gauss(tile)))
    ys, xs = T.tile_starts(H, tile, overlap), T.tile_starts(W, tile, overlap)
    assert len(ys) > 3 and len(xs) > 2
    for y in ys:
        for x in xs:
            out = S.super_resolve(backbone, lr_up[..., y:y + tile, x:x + tile]).double()
            num[..., y:y + tile, x:x + tile] += out * weight
            den[..., y:y + tile, x:x + tile] += weight
    blend = (num / den).float()
    for fix in ("none", "wavelet", "adain"):
        got = S.upscale(backbone, lr, 3, tile=tile, tile_overlap=overlap, vae_tile=tile, color_fix=fix,
                        tile_batch=5)
        want = color.color_correct(blend, lr_up, fix)
        assert (got - want).abs().max() < (2e-3 if fix == "adain" else 1e-4), fix


def test_upscaling_streams_bands_of_rows_and_scale_is_checked(backbone):
    from pipeline.upscale_config import UpscaleJobConfig

    lr = (np.random.default_rng(0).random((50, 20, 3)) * 255).astype(np.uint8)
    bands = []
    src, peak = U.image_source(lr)
    S.upscale_stream(backbone, [src], [(200, 80)], lambda k, top, rows: bands.append((top, rows.shape[1])),
                     tile=32, tile_overlap=8, vae_tile=32, color_fix="wavelet", peaks=[peak])
    assert [top for top, _ in bands] == list(np.cumsum([0] + [n for _, n in bands])[:-1])
    assert sum(n for _, n in bands) == 200
    assert len(bands) >= 4 and max(n for _, n in bands) <= 32 + 2 * color.WAVELET_MARGIN
    for bad in (0, -1, 1e6, math.inf, math.nan, 16.5):
        with pytest.raises(ValueError, match="scale"):
            UpscaleJobConfig(input="i", output="o", checkpoint="c", scale=bad)
    assert UpscaleJobConfig(input="i", output="o", checkpoint="c", scale=16).scale == 16


# ---- exit codes and early checks --------------------------------------------------------------------
def test_exit_codes_early_checks_and_summary(ray_local, pixel_ckpt, tmp_path, capsys, monkeypatch):
    from jobs.cli import main

    root = tmp_path / "in"
    _png(root / "good.png", _rgb(8, 8))
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    listed = []
    real_list = pipeline_inputs.list_input_groups
    monkeypatch.setattr(pipeline_inputs, "list_input_groups", lambda *a, **k: listed.append(a) or real_list(*a, **k))
    def status(*argv):
        try:
            return main(["upscale", *argv])
        except SystemExit as exit_:
            return exit_.code
    for args in (["--checkpoint", str(tmp_path / "nope")], ["--checkpoint", str(root)],
                 ["--checkpoint", pixel_ckpt, "--scale", "1e6"], ["--checkpoint", pixel_ckpt, "--weights", "target"]):
        assert status(str(root), out, *args) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[upscale]")]
        assert len(err) == 1 and err[0].startswith("flowsr upscale: error:") and "Traceback" not in err[0]
    assert listed == [] and not os.path.exists(out)  # refused before the corpus was touched
    assert status(str(tmp_path / "missing"), out, "--checkpoint", pixel_ckpt) == 2
    capsys.readouterr()
    assert main(["upscale", str(root), out, "--checkpoint", pixel_ckpt, "-s", "2", "--tile", "0"]) == 1
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert '"ok": 1' in summary and '"error": 1' in summary and '"unsupported": 1' in summary
    assert main(["upscale", str(root), out, "--checkpoint", pixel_ckpt, "-s", "2", "--tile", "0",
                 "--allow-errors"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert '"skipped": 1' in summary and '"error": 1' in summary


def test_upscaler_actors_leave_a_cpu_for_decoding_and_writing():
    """A 1-CPU local Ray hung: the actor held the CPU and no decode task could ever start."""
    from jobs.upscale import actor_cpus
    from pipeline.upscale_config import UpscaleJobConfig

    cfg = lambda **kw: UpscaleJobConfig(input="in", output="out", checkpoint="ckpt", **kw)
    assert actor_cpus(cfg(), 1) == 0.0
    assert actor_cpus(cfg(), 2) == 1.0
    assert actor_cpus(cfg(pool_size=3), 4) == 1.0
    assert actor_cpus(cfg(pool_size=3), 3) == pytest.approx(2 / 3)
    assert actor_cpus(cfg(pool_size=2, cpus_per_actor=4.0), 16) == 4.0
