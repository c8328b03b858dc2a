"""Distributed two-stage training (issue 5).

Fast: batch preparation, the metrics log, and the per-worker loop without Ray (a resumed run
equals an uninterrupted one). Slow (Ray Train, 2 CPU workers over gloo): both stages on the
pixel and the tiny SD backbone with inference from the final checkpoint; an injected worker
failure; a job submitted to a local Ray cluster started by the test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flowsr.config import resolve
from flowsr.data import collate, paired_crop, sample_generator, to_tensor
from flowsr.metrics_log import MetricsLog, read_csv
from pipeline.schema import encode_png, make_sample_id
from pipeline.shards import conform_pairs

HR, SCALE = 64, 4


# ---- test data: tiny HR / LR pairs in the pair schema ------------------------------------------
def make_pairs(n: int, seed: int = 0, hr_size: int = HR) -> pa.Table:
    """`n` crops of skimage's astronaut, HR `hr_size`^2 and bicubic LR (hr_size / 4)^2, as PNG rows."""
    from PIL import Image
    from skimage import data as skdata

    image = skdata.astronaut()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        y, x = (int(v) for v in rng.integers(0, image.shape[0] - 2 * hr_size, 2))
        hr = np.asarray(Image.fromarray(image[y:y + 2 * hr_size, x:x + 2 * hr_size]).resize((hr_size,) * 2, Image.BICUBIC))
        lr = np.asarray(Image.fromarray(hr).resize((hr_size // SCALE,) * 2, Image.BICUBIC))
        rows.append({"sample_id": make_sample_id("skimage://astronaut", y, x, 2 * hr_size),
                     "source_uri": "skimage://astronaut", "crop": json.dumps({"y": y, "x": x, "size": 2 * hr_size}),
                     "hr": encode_png(hr), "lr": encode_png(lr), "hr_size": hr_size, "scale": SCALE,
                     "degradation": "{}", "seed": seed, "conversion": "", "hr_caption": "an astronaut, sharp",
                     "lr_caption": "an astronaut, blurry", "caption_model": "test", "caption_prompt_version": "0"})
    return conform_pairs(pa.Table.from_pylist(rows))  # as the shard writer stores them


def row_batch(table: pa.Table, start: int = 0, size: int = 2):
    """A row batch as Ray's iter_batches(batch_format="numpy") gives it."""
    return {k: np.array(v, dtype=object) for k, v in table.slice(start, size).to_pydict().items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for name, n, seed in (("train", 16, 0), ("val", 2, 1)):  # one epoch covers every run below
        (root / name).mkdir()
        pq.write_table(make_pairs(n, seed), root / name / "part-00000.parquet")
    return {"train": str(root / "train"), "val": str(root / "val")}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from flowsr.tiny import tiny_overrides

    return tiny_overrides(str(tmp_path_factory.mktemp("tiny_models")))


# ---- flowsr/data.py ----------------------------------------------------------------------------
def test_paired_crop_keeps_hr_and_lr_aligned():
    hr = torch.rand(3, 128, 96)
    lr = torch.nn.functional.avg_pool2d(hr[None], SCALE)[0]  # LR pixel = mean of its 4x4 HR block
    for seed in range(5):
        hr_c, lr_c = paired_crop(hr, lr, 32, SCALE, torch.Generator().manual_seed(seed))
        assert hr_c.shape == (3, 32, 32) and lr_c.shape == (3, 8, 8)
        torch.testing.assert_close(torch.nn.functional.avg_pool2d(hr_c[None], SCALE)[0], lr_c)
    hr_c, lr_c = paired_crop(hr, lr, 32, SCALE, None)  # centred without a generator
    torch.testing.assert_close(hr_c, hr[:, 48:80, 32:64])


def test_collate_shapes_range_and_seeding():
    cfg = resolve("pixel-small", ["data.patch_size=32"]).data
    rows = row_batch(make_pairs(2))
    batch = collate(rows, cfg, seed=0, epoch=0)
    assert batch["hr"].shape == batch["lr"].shape == (2, 3, 32, 32)
    assert batch["hr"].dtype == torch.float32 and batch["hr"].abs().max() <= 1 and batch["lr"].abs().max() <= 1
    assert batch["hr_caption"] == ["an astronaut, sharp"] * 2 and batch["lr_caption"] == ["an astronaut, blurry"] * 2
    torch.testing.assert_close(collate(rows, cfg, seed=0, epoch=0)["hr"], batch["hr"])  # seeded per sample
    assert not torch.equal(collate(rows, cfg, seed=0, epoch=1)["hr"], batch["hr"])  # a new crop each epoch
    # the crop of a sample does not depend on the batch it is in
    torch.testing.assert_close(collate(row_batch(make_pairs(2), 1, 1), cfg, seed=0, epoch=0)["hr"][0], batch["hr"][1])
    # the LR input is the bicubic upsampling of the aligned LR crop: close to the HR crop
    assert (batch["lr"] - batch["hr"]).abs().mean() < 0.15
    assert to_tensor(np.full((2, 2, 3), 255, np.uint8)).eq(1).all()
    assert sample_generator(0, "a").initial_seed() != sample_generator(0, "b").initial_seed()


def test_collate_rejects_bad_input():
    table = make_pairs(1)
    with pytest.raises(ValueError, match="smaller than the LR patch"):
        collate(row_batch(table, 0, 1), resolve("pixel-small", ["data.patch_size=128"]).data)
    with pytest.raises(ValueError, match="is not 4x LR"):
        paired_crop(torch.zeros(3, 64, 64), torch.zeros(3, 15, 16), 32, SCALE)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), np.float32))


# ---- flowsr/metrics_log.py ---------------------------------------------------------------------
def test_metrics_log_is_resume_safe(tmp_path):
    log = MetricsLog(str(tmp_path), "stage1")
    for step in range(1, 5):
        log.log(step, {"loss": 1.0 / step, **({"val_psnr_1step": 20.0 + step} if step % 2 == 0 else {})})
    log.close(plot=False)
    resumed = MetricsLog(str(tmp_path), "stage1", resume_step=2)  # a restart from the step-2 checkpoint
    assert resumed.dropped == 2
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 0.5, "img_per_s": 3.0})
    png = resumed.close()
    rows = read_csv(str(tmp_path / "stage1.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert list(rows[0]) == ["step", "loss", "val_psnr_1step", "img_per_s"]
    assert rows[1]["val_psnr_1step"] == "22.0" and rows[3]["val_psnr_1step"] == ""
    assert os.path.getsize(png) > 0 and list((tmp_path / "tb" / "stage1").glob("events.*"))


# ---- flowsr/trainer.py without Ray -------------------------------------------------------------
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Steps 3-4 after a restart from the step-2 checkpoint give the weights of a straight run."""
    from safetensors.torch import load_file

    from flowsr.backbones.pixel import WEIGHT_NAME
    from flowsr.trainer import LocalSession, run_stage

    cfg = resolve("pixel-small", ["model.pixel_channels=[8,16]", "optim.batch_size=2", "optim.stage1_steps=4",
                                  "train.checkpoint_every=2", "optim.warmup_steps=2", "data.patch_size=32"])
    rows = row_batch(make_pairs(2))

    def batches(epoch):  # one batch per epoch: the data order after a resume matches too
        return [rows]

    straight = LocalSession(str(tmp_path / "a"))
    out = run_stage(cfg, 1, straight, batches, metrics_dir=str(tmp_path / "a" / "metrics"))
    assert out["step"] == 4 and [r["step"] for r in straight.reports] == [2, 4]
    resumed = LocalSession(str(tmp_path / "b"), restore_dir=straight.checkpoints[0])
    out = run_stage(cfg, 1, resumed, batches, metrics_dir=str(tmp_path / "b" / "metrics"))
    assert out["metrics"]["resumed_from"] == 2 and [r["step"] for r in resumed.reports] == [4]
    a, b = (load_file(os.path.join(s.checkpoints[-1], "student", WEIGHT_NAME)) for s in (straight, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        run_stage(cfg, 2, LocalSession(str(tmp_path / "c"), restore_dir=straight.checkpoints[-1]), batches,
                  init_from=straight.checkpoints[-1])


# ---- jobs/train.py without Ray -----------------------------------------------------------------
def test_cli_dry_run_and_bad_arguments(capsys, tmp_path):
    from jobs.cli import main as flowsr_main
    from jobs.train import main, train

    assert flowsr_main(["train", "--config", "pixel-small", "--num-workers", "2", "--set", "optim.batch_size=4",
                        "--storage-path", str(tmp_path), "--name", "x", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["per_worker_batch"] == 2 and out["plan"]["run_dir"] == str(tmp_path / "x")
    assert out["config"]["train"]["num_workers"] == 2 and out["config"]["optim"]["batch_size"] == 4
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    # a config mistake: one line on stderr, exit 2
    assert main(["--config", "pixel-small", "--num-workers", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "divide evenly" in err[0]
    with pytest.raises(ValueError, match="unknown stage"):
        train(resolve("pixel-small"), "unused", storage_path=str(tmp_path), name="x", stage=3)


def test_rerun_with_other_config_or_data_is_refused(capsys, tmp_path):
    """A rerun of a named run resumes only the same config and data; anything else is one line
    on stderr, exit 2, before Ray starts, and config.json keeps the first run's config."""
    from jobs.train import main
    from pipeline.train_ray import check_resume

    data = tmp_path / "shards"
    data.mkdir()
    pq.write_table(pa.table({"sample_id": ["a"]}), data / "part-0.parquet")
    cfg = resolve("pixel-small")
    run = tmp_path / "runs" / "r"
    assert check_resume(str(run), cfg, str(data)) is False
    written = (run / "config.json").read_text()
    assert json.loads(written)["optim"]["lr"] == cfg.optim.lr
    more_workers = resolve("pixel-small", ["train.num_workers=2", "train.checkpoint_every=7"])
    assert check_resume(str(run), more_workers, str(data)) is True  # how it runs may change
    base = ["--config", "pixel-small", "--storage-path", str(tmp_path / "runs"), "--name", "r"]
    for extra, changed in ((["--set", "optim.lr=0.5", "--data", str(data)], "optim.lr"),
                           (["--data", str(tmp_path / "other")], "data")):
        if changed == "data":
            (tmp_path / "other").mkdir()
            pq.write_table(pa.table({"sample_id": ["a", "b"]}), tmp_path / "other" / "part-0.parquet")
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert f"{changed}:" in err and "new --name" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.json").read_text() == written  # never overwritten


# ---- Ray Train ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray4():
    """A local Ray with 4 logical CPUs: 2 training workers plus room for Ray Data's read tasks."""
    import ray
    import ray.data

    ray.init(num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def csv_steps(path):
    return [int(r["step"]) for r in read_csv(path)]


def assert_inference_works(checkpoint: str, **kwargs):
    from flowsr.checkpoint import load_for_inference
    from flowsr.sample import resize_to, super_resolve

    backbone, cfg = load_for_inference(checkpoint, **kwargs)
    lr = collate(row_batch(make_pairs(1, seed=7), 0, 1), cfg.data, augment=False)["lr"]
    sr = super_resolve(backbone, lr, steps=1)
    assert sr.shape == (1, 3, HR, HR) and torch.isfinite(sr).all() and sr.abs().max() <= 1
    assert not torch.allclose(sr, resize_to(lr, sr.shape[-2:]))


@pytest.mark.slow
def test_pixel_backbone_two_workers_both_stages(ray4, shards, tmp_path):
    from flowsr.checkpoint import read_meta
    from flowsr.config import FlowSRConfig
    from jobs.train import train

    cfg = resolve("pixel-small", ["optim.batch_size=4", "optim.stage1_steps=3", "optim.stage2_steps=3",
                                  "train.num_workers=2", "train.checkpoint_every=2", "train.val_every=2",
                                  "train.log_every=1", "loss.lambda_adv=0.05"])  # pixel-small has no GAN term: switch it on
    out = train(cfg, shards["train"], val_uri=shards["val"], storage_path=str(tmp_path), name="pix")
    assert FlowSRConfig.load(os.path.join(out["run_dir"], "config.json")) == cfg
    for stage in (1, 2):
        assert read_meta(out[f"stage{stage}_checkpoint"]) == {"stage": stage, "step": 3, "epoch": 0}
        rows = read_csv(out[f"stage{stage}_metrics_csv"])
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        assert float(rows[-1]["val_psnr_4step"]) > 0 and float(rows[-1]["img_per_s"]) > 0
        assert os.path.getsize(out[f"stage{stage}_loss_curve"]) > 0
    assert {"flow", "cons", "adv", "disc"} <= set(read_csv(out["metrics_csv"])[0])
    assert os.path.exists(os.path.join(out["checkpoint"], "disc_heads.safetensors"))
    assert_inference_works(out["checkpoint"])
    assert_inference_works(out["checkpoint"], weights="target")
    again = train(cfg, shards["train"], storage_path=str(tmp_path), name="pix")  # finished stages are skipped
    assert again["checkpoint"] == out["checkpoint"] and csv_steps(again["metrics_csv"]) == [1, 2, 3]


@pytest.mark.slow
def test_tiny_sd_backbone_two_workers_both_stages(ray4, shards, tiny_models, tmp_path):
    from jobs.train import train

    cfg = resolve("tiny", [*tiny_models, "optim.stage1_steps=2", "optim.stage2_steps=2", "train.num_workers=2"])
    out = train(cfg, shards["train"], val_uri=shards["val"], storage_path=str(tmp_path), name="sd")
    assert csv_steps(out["stage1_metrics_csv"]) == csv_steps(out["stage2_metrics_csv"]) == [1, 2]
    assert {"cons", "adv", "iqa", "disc"} <= set(read_csv(out["metrics_csv"])[0])
    lora = Path(out["checkpoint"], "student", "pytorch_lora_weights.safetensors")
    assert lora.exists() and Path(out["checkpoint"], "target", lora.name).exists()
    assert_inference_works(out["checkpoint"])


@pytest.mark.slow
def test_injected_worker_failure_resumes_from_last_checkpoint(ray4, shards, tmp_path):
    from flowsr.checkpoint import read_meta
    from jobs.train import train

    cfg = resolve("pixel-small", ["model.pixel_channels=[8,16]", "optim.batch_size=2", "optim.stage1_steps=5",
                                  "train.num_workers=2", "train.checkpoint_every=2", "train.fail_at_step=4",
                                  "train.max_failures=1", "train.log_every=1"])
    out = train(cfg, shards["train"], storage_path=str(tmp_path), name="fault", stage=1)
    assert (tmp_path / "fault" / "fault_injected_stage1_step4").exists()
    assert read_meta(out["checkpoint"])["step"] == 5
    rows = read_csv(out["metrics_csv"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]  # step 3 ran twice, is logged once
    assert [int(r["resumed_from"]) for r in rows] == [0, 0, 2, 2, 2]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_ray_cluster(temp_dir: str) -> None:
    """`ray stop` for one cluster only: the processes that carry our --temp-dir, and their children."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or ())]
    procs = {p for r in roots for p in [r, *r.children(recursive=True)]} - {psutil.Process()}
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=15)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_job_submitted_to_local_cluster(shards, tiny_models, tmp_path):
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="frt", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, objects = _free_ports(9)
    start = [ray, "start", "--head", f"--port={gcs}", "--num-cpus=4", "--object-store-memory=500000000",
             f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node}", f"--object-manager-port={objects}",
             "--disable-usage-stats"]
    storage = f"file://{tmp_path}/runs"  # a URI: the remote-storage code path
    args = ["--config", "tiny", *[f"--set={o}" for o in tiny_models], "--set=optim.stage1_steps=2",
            "--data", shards["train"], "--val-data", shards["val"], "--stage", "1", "--storage-path", storage,
            "--name", "cluster", "--num-workers", "2"]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        t0 = time.time()
        job = subprocess.run([ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                              "--", sys.executable, "-m", "jobs.train", *args],
                             env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout, job.stdout[-3000:]
    finally:
        _stop_ray_cluster(temp_dir)
    run = tmp_path / "runs" / "cluster"
    assert csv_steps(str(run / "metrics" / "stage1.csv")) == [1, 2]
    assert (run / "config.json").exists() and list((run / "stage1").glob("checkpoint_step0000002"))
    print(f"cluster job: {time.time() - t0:.0f} s")


def test_file_uris_are_local_paths_to_the_training_run(tmp_path):
    """`jobs/train.py` had its own `is_remote`, true for `file://`: a file:// run directory got
    its metrics written to a temporary mirror and its CSV and checkpoint handed back as temporary
    copies. URIs now mean one thing (`pipeline.storage`): file:// is the local path it names."""
    from pipeline.storage import exists, is_local, local_copy, write_text
    from pipeline.train_ray import _metrics_dir, run_uri

    run = run_uri(f"file://{tmp_path}", "r1")
    assert run == f"file://{tmp_path}/r1" and is_local(run) and not is_local("s3://bucket/run")
    metrics, sync = _metrics_dir(run)
    assert (metrics, sync) == (f"{tmp_path}/r1/metrics", None)  # rank 0 writes there directly
    write_text(f"{run}/metrics/stage1.csv", "step,loss\n1,0.5\n")
    assert exists(f"{run}/metrics/stage1.csv") and not exists(f"{run}/metrics/stage2.csv")
    assert local_copy(f"{run}/metrics/stage1.csv") == f"{tmp_path}/r1/metrics/stage1.csv"
    assert run_uri(str(tmp_path / "rel"), "x") == str(tmp_path / "rel" / "x")
