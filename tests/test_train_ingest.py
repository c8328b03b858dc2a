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
from jobs.train import train
from pipeline.train_ray import check_resources, epoch_batches, ingest_cpus, load_datasets
from test_train import make_pairs

TINY_PIXEL = ["model.pixel_channels=[8,16]", "optim.stage1_steps=2", "train.checkpoint_every=2",
              "data.patch_size=32", "train.log_every=1"]


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


def test_training_order_is_shuffled_across_shards_per_epoch_and_reproducible(ray_local, tmp_path):
    """Shards hold consecutive crops of the same photos (as prepare_data writes them). Before, they
    were read in file order through a buffer of 4 batches: every batch came from one or two shards,
    in the same order every epoch."""
    import pyarrow as pa

    for k in range(8):
        ids = [f"s{k}-{i:02d}" for i in range(16)]
        pq.write_table(pa.table({"sample_id": ids, "hr": [b"h"] * 16, "lr": [b"l"] * 16,
                                 "hr_caption": ["c"] * 16, "lr_caption": ["c"] * 16}),
                       tmp_path / f"part-{k:05d}.parquet")
    cfg = resolve("pixel-small", [*TINY_PIXEL, "optim.batch_size=4", "data.shuffle_buffer_rows=32"])

    def orders(first_epoch, epochs):
        it = load_datasets(cfg, str(tmp_path), first_epoch=first_epoch)["train"].iterator()
        return [[str(s) for b in epoch_batches(it, cfg, e, 0, 1) for s in b["sample_id"]]
                for e in range(first_epoch, first_epoch + epochs)]

    first, again = orders(0, 2), orders(0, 2)
    assert first == again  # seeded: the same run reads the same order
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1])  # a new order each epoch
    for epoch in first:
        assert len(epoch) == 128 and len({s.split("-")[0] for s in epoch[:16]}) >= 4  # the first 4 batches mix shards
        assert sum(a.split("-")[0] == b.split("-")[0] for a, b in zip(epoch, epoch[1:])) < 64
    resumed = orders(1, 1)[0]  # a run resumed after epoch 0: a seeded order of its own
    assert resumed == orders(1, 1)[0] and resumed != first[0]
