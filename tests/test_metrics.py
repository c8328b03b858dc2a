"""Metrics (BasicSR PSNR / SSIM on Y, the learned suite offline), the evaluation job, the ablation job."""
import csv
import json
import sys
import os
import tempfile

import numpy as np
import torch
import pytest

from flowsr import metrics as M


# ---- fixed images ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """A 96x96 natural crop and a degraded copy (blur + noise), uint8 RGB."""
    import skimage.data
    from scipy import ndimage

    hr = skimage.data.astronaut()[100:196, 180:276].copy()
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(hr.astype(np.float64), sigma=(1.2, 1.2, 0))
    sr = np.clip(blurred + rng.normal(0, 6, hr.shape) + 0.5, 0, 255).astype(np.uint8)
    return sr, hr


def _y(image, border):
    return M.crop_border(M.rgb_to_y(image), border).astype(np.float64)


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_y_equals_skimage(pair, border):
    from skimage.metrics import peak_signal_noise_ratio

    sr, hr = pair
    ref = peak_signal_noise_ratio(_y(hr, border), _y(sr, border), data_range=255)
    assert M.psnr_y(sr, hr, border) == pytest.approx(ref, abs=1e-4)
    assert 20 < ref < 40


@pytest.mark.parametrize("border", [0, 4])
def test_ssim_y_equals_skimage(pair, border):
    from skimage.metrics import structural_similarity

    sr, hr = pair
    ref = structural_similarity(_y(hr, border), _y(sr, border), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)
    assert M.ssim_y(sr, hr, border) == pytest.approx(ref, abs=1e-4)
    assert 0.3 < ref < 0.99


def test_psnr_ssim_equal_basicsr(pair):
    """BasicSR's own functions (BGR input); ./run installs BasicSR 1.4.2 as the reference."""
    import torchvision.transforms.functional as tvf

    sys.modules.setdefault("torchvision.transforms.functional_tensor", tvf)  # basicsr 1.4.2 vs new torchvision
    import basicsr.metrics.psnr_ssim as psnr_ssim
    sr, hr = pair
    kw = dict(crop_border=4, input_order="HWC", test_y_channel=True)
    assert M.psnr_y(sr, hr, 4) == pytest.approx(psnr_ssim.calculate_psnr(sr[..., ::-1], hr[..., ::-1], **kw), abs=1e-4)
    assert M.ssim_y(sr, hr, 4) == pytest.approx(psnr_ssim.calculate_ssim(sr[..., ::-1], hr[..., ::-1], **kw), abs=1e-4)


def test_y_channel_is_bt601_studio_range():
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = M.rgb_to_y(colours)[0]
    np.testing.assert_allclose(y, [16.0, 16 + 65.481 + 128.553 + 24.966, 16 + 65.481, 16 + 128.553, 16 + 24.966],
                               atol=1e-3)


def test_border_crop_removes_border_errors(pair):
    _, hr = pair
    sr = hr.copy()
    sr[:4] = 255 - sr[:4]  # errors only inside a 4-pixel border
    sr[:, -4:] = 0
    assert M.psnr_y(sr, hr, 4) == float("inf")
    assert M.ssim_y(sr, hr, 4) == pytest.approx(1.0)
    assert M.psnr_y(sr, hr, 3) < 40 and M.ssim_y(sr, hr, 3) < 1.0


def test_metric_errors(pair):
    sr, hr = pair
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr_y(sr[:-4], hr)
    with pytest.raises(ValueError, match="too small"):
        M.ssim_y(sr[:8, :8], hr[:8, :8], 4)
    with pytest.raises(ValueError, match="unknown metrics"):
        M.MetricSuite(("psnr", "vif"))


# ---- the learned suite, offline -------------------------------------------------------------------
@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """Point torch.hub, pyiqa, openai-clip and Hugging Face caches at an empty folder."""
    import torch.hub

    pytest.importorskip("pyiqa")
    import pyiqa.utils.download_util as dl

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    monkeypatch.setattr(dl, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    yield tmp_path
    torch.hub.set_dir(old)


def test_unavailable_metrics_are_reported_with_reason_not_estimated(pair, empty_weight_caches):
    suite = M.MetricSuite(("lpips", "niqe", "musiq"))
    assert set(suite.unavailable) == {"lpips", "niqe", "musiq"} and not suite.available
    for name, reason in suite.unavailable.items():
        assert "not cached" in reason and "https://" in reason, reason
        assert str(empty_weight_caches) in reason  # names where the file is expected
        assert suite.status()[name].startswith("unavailable: ")
    assert suite.status()["psnr"] == suite.status()["ssim"] == "available"
    sr, hr = pair
    scores = suite.score([sr], [hr])
    assert set(scores) == {"psnr", "ssim"}  # nothing stands in for the missing metrics
    assert not any(p.is_file() for p in empty_weight_caches.rglob("*"))  # nothing downloaded, no partial file


def test_no_downloads_restores_hooks():
    import torch.hub

    before = torch.hub.download_url_to_file
    with M.no_downloads(), pytest.raises(M.WeightsUnavailable, match="downloads are off"):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", "/nonexistent/w.pth")
    assert torch.hub.download_url_to_file is before


# ---- the evaluation job ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random pixel-backbone checkpoint in the `flowsr.checkpoint` layout."""
    import torch

    from flowsr.build import build_stage1
    from flowsr.checkpoint import save_checkpoint
    from flowsr.config import apply_overrides, preset

    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]", "data.patch_size=32"])
    torch.manual_seed(0)
    models = build_stage1(cfg)
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint")
    save_checkpoint(path, cfg=cfg, stage=1, step=0, models=models, optimizers=[])
    return path


def _pairs(n=3, size=64):
    import skimage.data

    from pipeline.degrade import degrade

    image = skimage.data.coffee()
    out = []
    for i in range(n):
        hr = np.ascontiguousarray(image[40 * i:40 * i + size, 60 * i:60 * i + size])
        lr, _ = degrade(hr, seed=0, sample_id=f"coffee{i}", scale=4)
        out.append((f"coffee{i}", lr, hr))
    return out


def test_evaluate_pairs_psnr_ssim_per_image_and_mean(tiny_checkpoint):
    from flowsr.checkpoint import load_for_inference
    from pipeline.evaluation import evaluate_pairs

    backbone, _ = load_for_inference(tiny_checkpoint)
    pairs = _pairs()
    result = evaluate_pairs(backbone, [(lr, hr) for _, lr, hr in pairs], steps=(1, 4), return_images=True)
    assert result["methods"] == ["bicubic", "1-step", "4-step"]
    assert len(result["per_image"]) == 3
    first = result["per_image"][0]
    assert first["1-step"]["psnr"] == pytest.approx(M.psnr_y(first["images"]["1-step"], pairs[0][2], 4))
    for key in result["methods"]:
        assert result["mean"][key]["psnr"] == pytest.approx(np.mean([e[key]["psnr"] for e in result["per_image"]]))
        assert set(result["mean"][key]) == {"psnr", "ssim"}
    assert first["1-step"]["psnr"] != first["4-step"]["psnr"]
    # the bicubic baseline is an ordinary bicubic resize: OpenCV's INTER_CUBIC (a = -0.75,
    # half-pixel centres) of the uint8 LR to the HR size, scored by the same PSNR
    import cv2

    for entry, (_, lr, hr) in zip(result["per_image"], pairs):
        reference = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
        assert entry["bicubic"]["psnr"] == pytest.approx(M.psnr_y(reference, hr, 4), abs=0.05)
        assert abs(entry["bicubic"]["psnr"] - M.psnr_y(np.repeat(np.repeat(lr, 4, 0), 4, 1), hr, 4)) > 0.1
    no_model = evaluate_pairs(None, [(lr, hr) for _, lr, hr in pairs])
    assert no_model["methods"] == ["bicubic"]
    assert no_model["mean"]["bicubic"] == result["mean"]["bicubic"]


def test_folder_inputs_pair_by_stem(tmp_path, tiny_checkpoint):
    from PIL import Image

    from jobs.evaluate import folder_items
    from pipeline.evaluation import EvalConfig, PairEvaluator

    for d in ("hr", "lr", "sr"):
        (tmp_path / d).mkdir()
    for sid, lr, hr in _pairs(2):
        Image.fromarray(hr).save(tmp_path / "hr" / f"{sid}.png")
        Image.fromarray(lr).save(tmp_path / "lr" / f"{sid}.png")
        Image.fromarray(hr).save(tmp_path / "sr" / f"{sid}.png")  # a "method" that returns HR
    Image.fromarray(hr).save(tmp_path / "hr" / "unpaired.png")
    cfg = EvalConfig(data=str(tmp_path / "hr"), lr_dir=str(tmp_path / "lr"), sr=(("oracle", str(tmp_path / "sr")),),
                     out=str(tmp_path / "out"), metrics=())
    items = folder_items(cfg)
    assert [i["sample_id"] for i in items] == ["coffee0", "coffee1"]
    batch = {k: np.asarray([i[k] for i in items]) for k in items[0]}
    out = PairEvaluator(__import__("dataclasses").asdict(cfg))(batch)
    assert np.all(np.isinf(out["oracle/psnr"])) and np.allclose(out["oracle/ssim"], 1.0)
    assert np.all(out["bicubic/psnr"] < 40)
    assert (tmp_path / "out" / "images" / "oracle" / "coffee0.png").exists()
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(data="x", out="y")


def test_evaluate_job_on_ray_writes_tables_and_report(tmp_path, tiny_checkpoint, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowsr.checkpoint import load_for_inference
    from jobs.evaluate import main
    from pipeline.evaluation import evaluate_pairs
    from pipeline.schema import encode_png

    pairs = _pairs()
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table({"sample_id": [p[0] for p in pairs], "hr": [encode_png(p[2]) for p in pairs],
                      "lr": [encode_png(p[1]) for p in pairs], "scale": [4] * 3})
    pq.write_table(table, shards / "part-0.parquet")
    out = tmp_path / "eval"
    assert main(["--data", str(shards), "--checkpoint", tiny_checkpoint, "--out", str(out), "--metrics", "lpips",
                 "--dataset-name", "coffee-test", "--batch-size", "2", "--report-images", "2",
                 "--crop-size", "32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["dataset"] == "coffee-test"
    # LPIPS is scored exactly when its weights are on this machine (offline: never estimated)
    if M.MetricSuite(("lpips",)).available:
        assert summary["status"]["lpips"] == "available" and 0 <= summary["mean"]["1-step"]["lpips"] <= 1
    else:
        assert summary["status"]["lpips"].startswith("unavailable: ") and "lpips" not in summary["mean"]["1-step"]
    md = (out / "table1.md").read_text()
    assert "| coffee-test | Bicubic | - |" in md and "| FlowSR | 4 |" in md
    rows = list(csv.reader((out / "table1.csv").read_text().splitlines()))
    assert rows[0][:5] == ["Datasets", "Methods", "#Steps", "PSNR", "SSIM"]
    assert [r[1:3] for r in rows[1:]] == [["Bicubic", "-"], ["FlowSR", "1"], ["FlowSR", "4"]]
    per_image = list(csv.DictReader((out / "per_image.csv").read_text().splitlines()))
    assert [r["sample_id"] for r in per_image] == ["coffee0", "coffee1", "coffee2"]
    # the Ray job and the reusable function agree (up to a few pixels rounding differently to
    # uint8 where an actor's thread count changes the float summation order)
    backbone, _ = load_for_inference(tiny_checkpoint)
    direct = evaluate_pairs(backbone, [(lr, hr) for _, lr, hr in pairs], steps=(1, 4), ids=[p[0] for p in pairs])
    for i, key in enumerate(("bicubic", "1-step", "4-step")):
        assert float(rows[1 + i][3]) == pytest.approx(direct["mean"][key]["psnr"], abs=1e-2)
        assert float(rows[1 + i][4]) == pytest.approx(direct["mean"][key]["ssim"], abs=1e-4)
    page = (out / "report.html").read_text()
    for key in ("lr", "bicubic", "1-step", "4-step", "hr"):
        assert f'src="report/coffee0_{key}.png"' in page
        assert (out / "report" / f"coffee0_{key}.png").exists()
    assert "coffee2_hr.png" not in page  # only --report-images crops


# ---- the evaluation job's output: lease, run record, resume from committed parts -----------------
def _eval_args(shards, ckpt, out, *extra):
    return ["--data", str(shards), "--checkpoint", ckpt, "--out", str(out), "--steps", "1", "--metrics",
            "--batch-size", "1", "--report-images", "1", "--crop-size", "16", *extra]


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory, tiny_checkpoint, ray_local):
    """Four 32x32 pairs as a shard, and one uninterrupted evaluation of them (one part per pair)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.evaluate import main
    from pipeline.schema import encode_png

    root = tmp_path_factory.mktemp("eval_output")
    (root / "shards").mkdir()
    pairs = _pairs(4, size=32)
    pq.write_table(pa.table({"sample_id": [p[0] for p in pairs], "hr": [encode_png(p[2]) for p in pairs],
                             "lr": [encode_png(p[1]) for p in pairs]}), root / "shards" / "pairs.parquet")
    assert main(_eval_args(root / "shards", tiny_checkpoint, root / "one")) == 0
    return root


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _ids(paths):
    import pyarrow.parquet as pq

    return sorted(i for p in paths for i in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist())


def test_evaluate_rerun_evaluates_only_missing_pairs_and_gives_the_one_shot_tables(one_shot, tiny_checkpoint,
                                                                                   tmp_path, monkeypatch):
    """A run killed after two of four batches (its other parts and images removed) resumes: the
    rerun evaluates exactly the two missing pairs, and every table equals the one-shot run's."""
    import shutil

    import jobs.evaluate as E
    import pipeline.eval_results as R

    one = one_shot / "one"
    parts = sorted((one / "results").glob("part-*.parquet"))
    assert len(parts) == 4 and _ids(parts) == ["coffee0", "coffee1", "coffee2", "coffee3"]
    out = tmp_path / "partial"
    shutil.copytree(one, out)
    gone = _ids(parts[2:])
    for part in parts[2:]:
        (out / "results" / part.name).unlink()
    for sid in gone:
        (out / "images" / "1-step" / f"{sid}.png").unlink()
    for name in ("table1.csv", "table1.md", "per_image.csv", "summary.json", "report.html"):
        (out / name).unlink()
    committed = []
    monkeypatch.setattr(R, "DRIVER_SORT_ROWS", 0)  # the tables through Ray Data's sort (the large-output path)
    from jobs.common import job_parser

    args = job_parser("evaluate", E).parse_args(_eval_args(one_shot / "shards", tiny_checkpoint, out))
    cfg = E.config_from_args(args)
    summary = E.evaluate(cfg, on_part=committed.append)
    assert summary["evaluated"] == 2 and summary["resumed"] and summary["n_images"] == 4
    assert _ids([out / "results" / row["part"] for row in committed]) == gone  # only the missing pairs
    assert sorted(p.name for p in (out / "results").glob("part-*")) == sorted(p.name for p in parts)  # same names
    for sid in gone:
        assert (out / "images" / "1-step" / f"{sid}.png").read_bytes() == \
            (one / "images" / "1-step" / f"{sid}.png").read_bytes()
    for name in ("table1.csv", "table1.md", "per_image.csv"):
        assert (out / name).read_text() == (one / name).read_text(), name
    ours, theirs = json.loads((out / "summary.json").read_text()), json.loads((one / "summary.json").read_text())
    assert ours["mean"] == theirs["mean"] and ours["wins"] == theirs["wins"] and ours["n_images"] == 4
    assert [r["sample_id"] for r in csv.DictReader((out / "per_image.csv").read_text().splitlines())] == \
        ["coffee0", "coffee1", "coffee2", "coffee3"]
    assert not list(out.rglob(".tmp-*")) and not (out / "_lease.json").exists() and not (out / "_resume").exists()
    # a rerun of a finished output evaluates nothing and writes the same tables
    monkeypatch.setattr(R, "DRIVER_SORT_ROWS", 100_000)
    again = E.evaluate(cfg)
    assert again["evaluated"] == 0 and (out / "table1.csv").read_text() == (one / "table1.csv").read_text()


def test_evaluate_rerun_with_other_settings_is_refused_in_one_line(one_shot, tiny_checkpoint, tmp_path, capsys):
    import shutil

    import torch

    from flowsr.build import build_stage1
    from flowsr.checkpoint import save_checkpoint
    from flowsr.config import apply_overrides, preset
    from jobs.evaluate import main

    one = one_shot / "one"
    before = _files(one)
    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]", "data.patch_size=32"])
    torch.manual_seed(1)
    other = str(tmp_path / "other_checkpoint")
    save_checkpoint(other, cfg=cfg, stage=1, step=0, models=build_stage1(cfg), optimizers=[])
    for extra, changed in ((["--steps", "2"], "steps"), (["--seed", "3"], "seed"),
                           (["--color-fix", "wavelet"], "color_fix"), (["--tile", "16"], "tile"),
                           (["--scale", "2"], "scale"), (["--limit", "2"], "limit")):
        capsys.readouterr()
        assert main(_eval_args(one_shot / "shards", tiny_checkpoint, one, *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and changed in err and "--overwrite" in err and err.endswith("a new --out"), err
    assert main(_eval_args(one_shot / "shards", other, one)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint" in err, err
    grown = tmp_path / "shards"  # other data under the same sample_ids
    shutil.copytree(one_shot / "shards", grown)
    shutil.copy(grown / "pairs.parquet", grown / "more.parquet")
    assert main(_eval_args(grown, tiny_checkpoint, one)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inputs" in err, err
    moved = tmp_path / "moved"  # the same data elsewhere is the same input
    shutil.copytree(one_shot / "shards", moved)
    (moved / "_lease.json").write_text("{}")  # underscore files are not data
    from pipeline.eval_results import input_fingerprint
    from pipeline.evaluation import EvalConfig

    assert input_fingerprint(EvalConfig(data=str(moved), out="x", checkpoint="c")) == \
        input_fingerprint(EvalConfig(data=str(one_shot / "shards"), out="x", checkpoint="c"))
    assert _files(one) == before  # nothing written, nothing removed


def test_evaluate_overwrite_recomputes_every_pair(one_shot, tiny_checkpoint, tmp_path, capsys):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.evaluate import main

    out = tmp_path / "replaced"
    shutil.copytree(one_shot / "one", out)
    ghost = out / "results" / "part-ghost.parquet"  # a result of the earlier run that the new one lacks
    pq.write_table(pa.table({"sample_id": ["ghost"], "bicubic/psnr": [1.0]}), ghost)
    assert main(_eval_args(one_shot / "shards", tiny_checkpoint, out, "--steps", "2")) == 2
    assert main(_eval_args(one_shot / "shards", tiny_checkpoint, out, "--steps", "2", "--overwrite")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 4 and summary["n_images"] == 4 and not ghost.exists()
    assert [m[0] for m in summary["methods"]] == ["bicubic", "2-step"] and not (out / "images" / "1-step").exists()
    rows = list(csv.reader((out / "table1.csv").read_text().splitlines()))
    assert [r[1:3] for r in rows[1:]] == [["Bicubic", "-"], ["FlowSR", "2"]]
    assert json.loads((out / "_run.json").read_text())["params"]["steps"] == [2]


def test_evaluate_refuses_an_output_held_by_a_live_run(one_shot, tiny_checkpoint, tmp_path, capsys):
    from jobs.evaluate import main
    from pipeline.lease import Lease
    from pipeline.storage import resolve_fs

    out = tmp_path / "busy"
    fs, root = resolve_fs(str(out))
    fs.create_dir(root)
    with Lease(fs, root, str(out)):  # another evaluate holding OUT (a live process: this one)
        capsys.readouterr()
        assert main(_eval_args(one_shot / "shards", tiny_checkpoint, out)) == 2
        err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use by another run" in err, err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written beside the lease


def test_evaluate_images_are_written_atomically_and_only_inside_out(tmp_path):
    """Per-image PNGs go through `pipeline.output.path_inside`: a folder of OUT that is a symbolic
    link to elsewhere is refused, a hostile sample_id stays one file name, no temporary is left."""
    import dataclasses
    import os

    from pipeline.evaluation import EvalConfig, PairEvaluator, safe_name
    from pipeline.output import OutputError, path_inside
    from pipeline.storage import resolve_fs

    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "images").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, out / "images" / "hr")
    evaluator = PairEvaluator(dataclasses.asdict(EvalConfig(data=str(tmp_path), out=str(out),
                                                            sr=(("m", str(tmp_path)),), metrics=())))
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(OutputError, match="outside"):
        evaluator._save("hr", "s0", image)
    assert not list(outside.iterdir())
    evaluator._save("bicubic", "../../escape", image)
    assert [p.name for p in (out / "images" / "bicubic").iterdir()] == [f"{safe_name('../../escape')}.png"]
    assert all(out in p.parents for p in tmp_path.rglob("*escape*"))
    fs, root = resolve_fs(str(out))
    for bad in ("..", "a/b", "", "."):
        with pytest.raises(OutputError, match="plain file name"):
            path_inside(fs, root, "images", bad)


# ---- the ablation job -----------------------------------------------------------------------------
def test_ablate_tiny_end_to_end(tmp_path):
    from diffusers import UNet2DModel  # noqa: F401  (import costs are not the job's: warm them first)

    from jobs.ablate import STAGE1_RUNS, STAGE2_RUNS, main

    pytest.importorskip("pyiqa")
    assert main(["--size", "tiny", "--out", str(tmp_path), "--seed", "3"]) == 0  # in-process: no --address
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == set(STAGE1_RUNS) | set(STAGE2_RUNS)
    for name, r in results["results"].items():
        assert np.isfinite(r["mean"]["1-step"]["psnr"]) and np.isfinite(r["mean"]["4-step"]["ssim"]), name
    text = (tmp_path / "tables.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Claims"):
        assert title in text
    for table, n_rows in (("table2", 6), ("table3", 8), ("table4", 7)):
        assert len((tmp_path / f"{table}.csv").read_text().splitlines()) == n_rows + 1
    assert {c["verdict"] for c in results["claims"]} <= {"reproduced", "not reproduced", "untestable"}
    assert (tmp_path / "models" / "hrcl" / "config.json").exists()


def test_ablate_runs_share_batches_and_differ_only_by_method():
    from jobs.ablate import STAGE2_RUNS, base_config, run_configs

    base = base_config("small")
    runs = run_configs(base)
    # Tables 2-4: each run is the base config with only its ablated fields changed (same data,
    # batch size, steps, lr and train.seed, hence the same batches and draws)
    expected = {"sr_flow": {}, "noise": {"model.flow_source": "noise"},
                "noised_lr": {"model.flow_source": "noised_lr"}, "hrcl": {}, "cd": {"loss.consistency": "cd"},
                "hr": {"loss.consistency": "hr"}, "fast_slow_1": {"schedule.n_fast": 1},
                "fast_slow_8": {"schedule.n_fast": 8},
                "n_interval_4": {"schedule.sampler": "n_interval", "schedule.n_intervals": 4},
                "n_interval_18": {"schedule.sampler": "n_interval"},  # 18 is the base's n_intervals
                "n_interval_50": {"schedule.sampler": "n_interval", "schedule.n_intervals": 50},
                "slow_only": {"schedule.sampler": "slow_only"}}
    flat = lambda cfg: {f"{sec}.{k}": v for sec, fields in cfg.to_dict().items() if isinstance(fields, dict)
                        for k, v in fields.items()}
    assert set(runs) == set(expected)
    for name, (stage, cfg) in runs.items():
        diff = {k: v for k, v in flat(cfg).items() if flat(base)[k] != v}
        assert diff == expected[name], name
        assert stage == (2 if name in STAGE2_RUNS else 1)
    assert base.schedule.n_intervals == 18
    with pytest.raises(ValueError, match="unknown size"):
        base_config("huge")


def test_ablate_stage2_trains_the_discriminator_when_the_gan_loss_is_on():
    """ablate had its own loop that passed `(opt, None)` to stage2_step: with loss.lambda_adv > 0
    its discriminator heads never moved. It now trains through `flowsr.trainer.run_stage`: the
    heads saved after 4 steps differ from those after 2 (both start from the same seeded init),
    and the optimiser state is not shipped with the run's model."""
    from safetensors.torch import load_file

    from flowsr.checkpoint import DISC_NAME, STATE_NAME
    from jobs.ablate import SIZES, base_config, build_data, train_and_evaluate

    data = build_data(SIZES["tiny"], seed=0)
    base = base_config("tiny", ["loss.lambda_adv=0.5", "optim.warmup_steps=0"])
    _, stage1 = train_and_evaluate("s1", 1, base.to_dict(), data, seed=0)
    assert DISC_NAME not in stage1 and STATE_NAME not in stage1
    heads = {}
    for steps in (2, 4):
        cfg = base_config("tiny", ["loss.lambda_adv=0.5", "optim.warmup_steps=0", f"optim.stage2_steps={steps}"])
        result, files = train_and_evaluate(f"s2-{steps}", 2, cfg.to_dict(), data, seed=0, init_files=stage1)
        assert result["steps"] == steps and np.isfinite(result["mean"]["1-step"]["psnr"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, DISC_NAME)
            with open(path, "wb") as f:
                f.write(files[DISC_NAME])
            heads[steps] = load_file(path)
    assert heads[2].keys() == heads[4].keys()
    moved = [k for k in heads[2] if not torch.equal(heads[2][k], heads[4][k])]
    assert moved, "the discriminator heads did not train between step 2 and step 4"
