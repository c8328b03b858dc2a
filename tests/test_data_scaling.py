"""The data stage's Ray Data plan: one operator of parallel degrade tasks, each working through a
run of `files_per_task`-file units and captioning (template) and writing its own pairs as shards
of `shard_rows` rows. No writer stage: an actor pool's start held up a small job's first tasks
for ~1 s, and 0-CPU writer tasks started a Python process for most shards. Before that, Ray Data
fused a writer's `shard_rows` batching into the degrade operator, so one task degraded every file
of a small job and a second CPU added nothing."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from jobs import prepare_data as P
from pipeline import output as out
from pipeline.caption import CaptionConfig
from pipeline.pairs_dataset import build_dataset


def write_files(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"f{i}.png")


def run_plan(tmp_path, name, **kw):
    cfg = P.PrepareConfig(input=str(tmp_path / "in"), output=str(tmp_path / name), patch_size=32,
                          crops_per_image=1, **kw)
    with out.open_output(cfg.output, cfg.record()) as output:
        listing = P.write_work_listing(cfg, output)
        ds = build_dataset(listing, cfg, P.READER)
        written = list(ds.iter_rows())
    return cfg, written, ds._get_stats_summary()


def degrade_tasks(stats) -> int:
    """Tasks of the degrade operator, from Ray Data's structured execution stats (the numbers
    `ds.stats()` prints; one row count per task that produced rows)."""
    names = [op.operator_name for op in stats.operators_stats]
    degrade = [op for op in stats.operators_stats if "degrade_units" in op.operator_name]
    assert len(degrade) == 1, names
    assert not any("ShardWriter" in n or "template_captions" in n for n in names), names  # nothing after it
    return degrade[0].task_rows.count


def test_degrade_tasks_follow_files_per_task_and_write_their_shards(ray_local, tmp_path):
    write_files(tmp_path / "in", 6)
    cfg, written, stats = run_plan(tmp_path, "out", shard_rows=2, files_per_task=2, captioner="template")
    assert degrade_tasks(stats) == 3, stats  # 6 files / files_per_task 2 (and 3 full shards of 2)
    assert sorted(r["rows"] for r in written) == [2, 2, 2]
    table = pq.read_table([str(tmp_path / "out" / r["shard"]) for r in written])
    assert table.num_rows == 6 and len(set(table.column("sample_id").to_pylist())) == 6
    # captioned in the tasks: the template's captions, one per pair, from its degradation
    assert all(table.column("lr_caption").to_pylist()) and all(table.column("hr_caption").to_pylist())
    assert set(table.column("caption_model").to_pylist()) == {CaptionConfig(backend="template").caption_model}


def test_tasks_are_as_few_as_fill_their_shards_but_one_per_cpu(ray_local, tmp_path):
    """8 one-file units would be 8 tasks; 8 pairs fill two shards of 4 and there are 2 CPUs: 2
    tasks, each writing one full shard (not eight 1-row shards)."""
    write_files(tmp_path / "in", 8)
    cfg, written, stats = run_plan(tmp_path, "out", shard_rows=4, files_per_task=1)
    assert degrade_tasks(stats) == 2, stats
    assert sorted(r["rows"] for r in written) == [4, 4]
    # a shard size above the corpus: still one task per CPU, each writing its part as one shard
    cfg, written, stats = run_plan(tmp_path, "big", shard_rows=1000, files_per_task=1)
    assert degrade_tasks(stats) == 2, stats
    assert sorted(r["rows"] for r in written) == [4, 4]
