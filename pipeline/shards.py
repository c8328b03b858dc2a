"""Pair shards: PAIR_SCHEMA Parquet parts committed under an output folder, and the two ways
they are made.

- `write_shards`: inside the task that makes the pairs, its pairs cut into shards of
  `shard_rows` rows as they come (the data stage with CPU captions or none: one operator, no
  writer process at all);
- `add_shard_writer`: a Ray Data stage of 0-CPU writer actors, for pairs that come out of
  another pool first (the qwen2vl captioner's GPU actors).

Apart from `pipeline.pairs_dataset` so that a writer process imports pyarrow, the schema and the
output layer only (not OpenCV, SciPy and the degradation): a writer actor starts in about half
the time, which a small job on a few cores feels.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Optional

import pyarrow as pa

from pipeline import output as out
from pipeline.schema import CAPTION_COLUMNS, IMAGE_COLUMNS, PAIR_SCHEMA, image_storage, with_shard_metadata
from pipeline.storage import resolve_fs

SHARDS_DIR = "shards"
SHARD_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64())])  # a writer's output rows
CPUS_PER_WRITER = 32  # cluster CPUs of degrade tasks one writer keeps up with (see writer_pool_size)


def conform_pairs(table: pa.Table) -> pa.Table:
    """A batch of pair rows -> exactly PAIR_SCHEMA; missing caption columns become "", image
    columns of PNG bytes become `datasets`' image storage (`image_storage`)."""
    columns = []
    for field in PAIR_SCHEMA:
        if field.name in IMAGE_COLUMNS and field.name in table.column_names:
            columns.append(image_storage(table.column(field.name)))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name in CAPTION_COLUMNS:
            columns.append(pa.array([""] * table.num_rows, field.type))
        else:
            raise ValueError(f"pair batch lacks column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=PAIR_SCHEMA)


def write_shard(table: pa.Table, output: str, params_version: Optional[int]) -> Optional[Dict[str, Any]]:
    """Commit one shard of pair rows under output/shards, named by its sample ids (a retried
    write replaces, never duplicates); its {"shard", "rows"}, or None when `table` is empty."""
    if table.num_rows == 0:
        return None
    fs, root = resolve_fs(output)
    table = with_shard_metadata(conform_pairs(table), params_version=params_version)
    name = out.content_part_name(table.column("sample_id").to_pylist())
    out.write_parquet_atomic(fs, out.path_inside(fs, root, SHARDS_DIR, name), table)
    return {"shard": f"{SHARDS_DIR}/{name}", "rows": table.num_rows}


def shard_rows_table(written: Optional[Dict[str, Any]]) -> pa.Table:
    """`write_shard`'s result as a SHARD_SCHEMA table (no row for an empty shard)."""
    return pa.Table.from_pylist([written] if written else [], schema=SHARD_SCHEMA)


def write_shards(tables: Iterable[pa.Table], output: str, params_version: Optional[int],
                 shard_rows: int) -> Iterator[pa.Table]:
    """Pair tables, as a task makes them -> a shard committed each time `shard_rows` rows have
    come, and the rest as one last, shorter shard -> each shard's SHARD_SCHEMA row as it is written.

    Which rows make a shard depends only on the order of the rows, so a retried task writes the
    same shards under the same names (they replace, never duplicate). At most `shard_rows` rows
    plus one incoming table are held.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    pending, held = [], 0
    for table in tables:
        if table.num_rows == 0:
            continue
        pending.append(table)
        held += table.num_rows
        while held >= shard_rows:
            rows = pa.concat_tables(pending)
            yield shard_rows_table(write_shard(rows.slice(0, shard_rows), output, params_version))
            rest = rows.slice(shard_rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield shard_rows_table(write_shard(pa.concat_tables(pending), output, params_version))


class ShardWriter:
    """Ray Data callable class: a batch of pair rows -> one committed shard -> its SHARD_SCHEMA row.

    It runs on a small pool of long-lived actors that ask for no CPU. As 0-CPU tasks instead,
    each write took a worker process of its own while the degrade tasks held the others, and
    Ray started (and, above its idle-worker limit of one per CPU, killed again) a Python process
    for most shards, ~1.5 CPU-seconds each, which is what kept a second CPU from helping.
    """

    def __init__(self, output: str, params_version: Optional[int]):
        self.output, self.params_version = output, params_version

    def __call__(self, batch: pa.Table) -> pa.Table:
        return shard_rows_table(write_shard(batch, self.output, self.params_version))


def writer_pool_size(cluster_cpus: float) -> int:
    """Writer actors for a cluster of `cluster_cpus` CPUs: one per CPUS_PER_WRITER, at least one."""
    return max(1, int(cluster_cpus // CPUS_PER_WRITER))


def add_shard_writer(ds, output: str, params_version: Optional[int], shard_rows: int, cluster_cpus: float):
    """Ray Data adapter: pair rows -> one committed shard per `shard_rows` rows -> SHARD_SCHEMA rows.

    The writer only concatenates rows whose PNGs are already encoded, so it asks for no CPU: with
    one, Ray Data would fuse its `shard_rows` batching into the upstream tasks (one task doing a
    small job's whole work) or hold a CPU of the budget for it, idle most of the time.
    """
    import ray

    return ds.map_batches(ShardWriter, fn_constructor_args=(output, params_version), batch_size=shard_rows,
                          batch_format="pyarrow", num_cpus=0,
                          compute=ray.data.ActorPoolStrategy(size=writer_pool_size(cluster_cpus)))
