"""The data stage's Ray Data plan keeps its degrade work in parallel tasks of `files_per_task`
files: the shard writer (which asks for no CPU) is neither fused into the degrade operator nor
given a CPU of the budget, and template captions run inside the degrade tasks. Before, Ray
Data fused the writer's `shard_rows` batching into the degrade operator, so one task degraded
every file of a small job and a second CPU added nothing."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

from jobs import prepare_data as P
from pipeline import output as out


def test_degrade_tasks_follow_files_per_task(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(src / f"f{i}.png")
    cfg = P.PrepareConfig(input=str(src), output=str(tmp_path / "out"), patch_size=32, crops_per_image=1,
                          shard_rows=500, files_per_task=2, captioner="template")
    with out.open_output(cfg.output, cfg.record()) as output:
        listing = P.write_work_listing(cfg, output)
        ds = P.build_dataset(listing, cfg)
        written = list(ds.iter_rows())
    assert sum(r["rows"] for r in written) == 6 and len(written) == 1  # one shard of <= shard_rows rows
    stats = ds.stats()
    degrade = re.search(r"MapBatches\(degrade_units\)[^\n:]*: (\d+) tasks executed", stats)
    assert degrade is not None, stats
    assert "ShardWriter" not in degrade.group(0), stats  # the writer is an operator of its own
    assert "template_captions" in degrade.group(0), stats  # captions inside the degrade tasks
    assert int(degrade.group(1)) == 3, stats  # 6 files / files_per_task 2
