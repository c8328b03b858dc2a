"""Training never waits forever for its own data.

Ray Data's read tasks ask for one CPU each by default; with as many one-CPU training workers as
the cluster has CPUs they would never be scheduled and `fit()` would hang. `jobs.train` gives the
reads no CPU of their own in that case, and fails fast when the workers themselves cannot fit on
the embedded local Ray.
"""
from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from flowsr.config import resolve
from jobs.train import check_resources, ingest_cpus, train
from test_train import make_pairs

TINY_PIXEL = ["model.pixel_channels=[8,16]", "optim.stage1_steps=2", "train.checkpoint_every=2",
              "data.patch_size=32"]


def pixel_cfg(workers: int, cpus_per_worker: int = 1):
    return resolve("pixel-small", [*TINY_PIXEL, f"optim.batch_size={2 * workers}", f"train.num_workers={workers}",
                                   f"train.cpus_per_worker={cpus_per_worker}", "train.use_gpu=false"])


def test_ingest_cpus_follow_the_spare_cpus():
    cfg = pixel_cfg(2)
    assert ingest_cpus(cfg, {"CPU": 2.0}) == 0  # the workers hold every CPU: reads share them
    assert ingest_cpus(cfg, {"CPU": 2.5}) == 0  # half a CPU cannot run a one-CPU read task
    assert ingest_cpus(cfg, {"CPU": 3.0}) is None  # one to spare: Ray Data's default
    assert ingest_cpus(pixel_cfg(2, cpus_per_worker=4), {"CPU": 8.0}) == 0
    assert ingest_cpus(pixel_cfg(2, cpus_per_worker=4), {"CPU": 9.0}) is None


def test_resource_check_fails_fast_on_a_local_ray_only(capsys):
    cfg = pixel_cfg(3)
    check_resources(cfg, {"CPU": 3.0}, can_grow=False)  # fits exactly: fine
    with pytest.raises(ValueError, match=r"3 training workers need 3 CPU \(the cluster has 2\)"):
        check_resources(cfg, {"CPU": 2.0}, can_grow=False)
    gpu = resolve("pixel-small", [*TINY_PIXEL, "optim.batch_size=2", "train.num_workers=2", "train.use_gpu=true"])
    with pytest.raises(ValueError, match=r"2 GPU \(the cluster has 0\)"):
        check_resources(gpu, {"CPU": 8.0}, can_grow=False)
    check_resources(cfg, {"CPU": 2.0}, can_grow=True)  # a cluster that may scale up: a note, no error
    assert "waiting for the cluster to scale up" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest_shards")
    pq.write_table(make_pairs(8), root / "part-00000.parquet")
    return str(root)


def test_more_workers_than_local_cpus_fail_fast(ray_local, shards, tmp_path):
    cpus = int(ray_local.cluster_resources()["CPU"])
    start = time.perf_counter()
    with pytest.raises(ValueError, match="training workers need"):
        train(pixel_cfg(cpus + 1), shards, storage_path=str(tmp_path), name="too-many", stage=1)
    assert time.perf_counter() - start < 10 and not (tmp_path / "too-many").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_as_many_workers_as_cpus_completes(ray_local, shards, tmp_path):
    """Before: "Cluster resources are not enough to run any task from ReadFilesParquetV2", forever."""
    from flowsr.metrics_log import read_csv

    cpus = int(ray_local.cluster_resources()["CPU"])
    start = time.perf_counter()
    out = train(pixel_cfg(cpus), shards, storage_path=str(tmp_path), name="all-cpus", stage=1)
    assert [int(r["step"]) for r in read_csv(out["metrics_csv"])] == [1, 2]
    print(f"{cpus} workers on {cpus} CPUs: {time.perf_counter() - start:.0f} s")
