"""Work listings: chunk files of listed inputs, handed to Ray Data tasks a run of units at a time.

`write_listing_chunks` streams a listing into Parquet chunk files; `ListingUnits` cuts their rows
into units and spreads the units over `task_count` runs of consecutive units, one task each,
without the driver or an up-front task reading every row.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.output import PARQUET_SUFFIX, write_parquet_atomic

LISTING_ROW_GROUP = 1024  # rows per row group of a listing chunk: a task reads one group or two
# Ray Data tasks over a listing, each working through a run of consecutive units: about
# TASKS_PER_CPU per cluster CPU (each task start costs ~0.25 s of a worker's time, a unit of small
# crops ~0.4 s), more when that makes runs longer than MAX_UNITS_PER_TASK (a new node joining an
# autoscaling cluster finds work), never more than MAX_LISTING_BLOCKS (the driver holds the tasks)
TASKS_PER_CPU = 4
MAX_UNITS_PER_TASK = 16
MAX_LISTING_BLOCKS = 10_000


def task_count(units: int, cluster_cpus: float, max_tasks: int = MAX_LISTING_BLOCKS) -> int:
    """Tasks to spread `units` cheap units of work over (each task doing a run of consecutive
    units): about TASKS_PER_CPU per cluster CPU, more when runs would pass MAX_UNITS_PER_TASK,
    at most one per unit and at most `max_tasks`."""
    wanted = max(TASKS_PER_CPU * max(1, int(cluster_cpus)), -(-units // MAX_UNITS_PER_TASK))
    return max(1, min(units, wanted, max_tasks))


@dataclass(frozen=True)
class ListingUnits:
    """The rows of listing chunks (Parquet files on `fs`, `rows[i]` rows in `chunks[i]`) cut into
    units of `per_unit` consecutive rows of one chunk, numbered 0 .. count-1.

    The units are spread over `runs(cluster_cpus)` runs of consecutive units; `dataset(runs)` is
    a Ray Dataset of the run numbers (column "id"), made inside Ray Data from one integer range:
    the driver holds the chunk paths and their row counts, never a row per unit, and no Ray task
    lists or reads the chunks up front (Ray Data's Parquet read would run a listing task and a
    footer reader before the first unit, and its repartition task would keep a CPU busy while it
    passes every row on). A task takes its run's units (`units_of_run`) and reads their rows with
    `iter_rows(units)`, each row group once.
    """
    fs: pafs.FileSystem
    chunks: Sequence[str]
    rows: Sequence[int]
    per_unit: int

    @functools.cached_property
    def ends(self) -> List[int]:
        """Unit number one past the last unit of each chunk."""
        ends, total = [], 0
        for n in self.rows:
            total += -(-n // self.per_unit)
            ends.append(total)
        return ends

    @property
    def count(self) -> int:
        return self.ends[-1] if self.ends else 0

    def runs(self, cluster_cpus: float) -> int:
        """Runs of consecutive units to spread over the cluster, one task each (`task_count`)."""
        return task_count(self.count, cluster_cpus)

    @staticmethod
    def dataset(runs: int):
        """Run numbers 0 .. runs-1 as a Ray Dataset of one block each: a map with no batch size
        fuses with their read, so each run is one task."""
        import ray

        return ray.data.range(runs, override_num_blocks=runs)

    def rows_dataset(self, cluster_cpus: float):
        """Every row, as a Ray Dataset: `runs(cluster_cpus)` tasks, each reading its run's units
        (a block per unit). What it is mapped with (no batch size) runs in the same tasks. Unlike
        `ray.data.read_parquet`, no listing or footer task comes first (1.5-4 s of a small job
        on 2 CPUs)."""
        runs = self.runs(cluster_cpus)
        return self.dataset(runs).map_batches(rows_of_runs, fn_kwargs={"listing": self, "runs": runs},
                                              batch_size=None, batch_format="pyarrow")

    def units_of_run(self, run: int, runs: int) -> range:
        """The units of run `run` of `runs` (runs differ in length by one unit at most)."""
        return range(run * self.count // runs, (run + 1) * self.count // runs)

    def locate(self, unit: int) -> tuple:
        """(chunk index, first row, row after the last) of `unit`."""
        if not 0 <= unit < self.count:
            raise IndexError(f"listing unit {unit} is not in 0..{self.count - 1}")
        chunk = int(np.searchsorted(self.ends, unit, side="right"))
        first = (unit - (self.ends[chunk - 1] if chunk else 0)) * self.per_unit
        return chunk, first, min(first + self.per_unit, self.rows[chunk])

    def rows_of(self, unit: int) -> pa.Table:
        """The listing rows of `unit`."""
        return next(self.iter_rows([unit]))

    def iter_rows(self, units: Iterable[int]) -> Iterator[pa.Table]:
        """The listing rows of each of `units` in turn, read from the row groups of its chunk
        that hold them. Consecutive units of one chunk share the chunk's open file and footer,
        and a row group is read once for all the units it holds (only the groups of the current
        unit are kept)."""
        with contextlib.ExitStack() as stack:
            current, reader, starts, held = None, None, [], {}
            for unit in units:
                chunk, first, stop = self.locate(unit)
                if chunk != current:
                    stack.close()
                    reader = pq.ParquetFile(stack.enter_context(self.fs.open_input_file(self.chunks[chunk])))
                    sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
                    starts = list(np.cumsum([0] + sizes))
                    current, held = chunk, {}
                groups = [g for g in range(len(starts) - 1) if starts[g] < stop and starts[g + 1] > first]
                held = {g: held[g] if g in held else reader.read_row_group(g) for g in groups}
                table = pa.concat_tables([held[g] for g in groups])
                yield table.slice(first - starts[groups[0]], stop - first)


def rows_of_runs(batch: pa.Table, listing: ListingUnits, runs: int) -> Iterator[pa.Table]:
    """Batch of run numbers {id} -> the rows of each unit of those runs, unit by unit."""
    for run in batch.column("id").to_pylist():
        yield from listing.iter_rows(listing.units_of_run(run, runs))


def write_listing_chunks(fs: pafs.FileSystem, directory: str, rows: Iterable[Dict[str, Any]],
                         schema: pa.Schema, chunk_rows: int, row_group: int = LISTING_ROW_GROUP) -> tuple:
    """Stream listing `rows` into `directory/listing-NNNNN.parquet` files of `chunk_rows` rows
    (the last one fewer), row groups of `row_group` rows. Returns (chunk paths, their row
    counts). The listing is never held whole."""
    paths, counts, chunk = [], [], []

    def flush():
        path = f"{directory.rstrip('/')}/listing-{len(paths):05d}{PARQUET_SUFFIX}"
        write_parquet_atomic(fs, path, pa.Table.from_pylist(chunk, schema=schema), row_group)
        paths.append(path)
        counts.append(len(chunk))
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            flush()
    if chunk:
        flush()
    return paths, counts
