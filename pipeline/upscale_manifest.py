"""The upscale job's manifest: one row per input, committed part by part through `pipeline.output`.

During a run every finished batch of rows is committed atomically as a part
(`part-<hash of its inputs>.parquet`) under OUT/PARTS_DIR (`pipeline.naming`); at the end the
parts are streamed into one Parquet file (OUT/MANIFEST_NAME, or `--manifest`), one part in
memory at a time. Columns: MANIFEST_COLUMNS, typed by `manifest_schema()`.
"""
from __future__ import annotations

from typing import Dict, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import output as layer
from pipeline.inputs import split_uri

MANIFEST_COLUMNS = ("input", "output", "in_height", "in_width", "out_height", "out_width", "seconds",
                    "status", "error", "input_sha256")  # input_sha256: the content the output was made from


def manifest_schema():
    return pa.schema([("input", pa.string()), ("output", pa.string()), ("in_height", pa.int32()),
                      ("in_width", pa.int32()), ("out_height", pa.int32()), ("out_width", pa.int32()),
                      ("seconds", pa.float64()), ("status", pa.string()), ("error", pa.string()),
                      ("input_sha256", pa.string())])


def manifest_table(rows: Dict[str, Sequence]):
    """Manifest rows (a dict of columns; missing columns are 0.0 seconds or null) as a table of
    `manifest_schema()`."""
    n = len(rows["input"])
    return pa.table({k: list(rows[k]) if k in rows else [0.0 if k == "seconds" else None] * n
                     for k in MANIFEST_COLUMNS}, schema=manifest_schema())


def commit_manifest_part(rows: Dict[str, Sequence], parts_dir: str) -> None:
    """Commit manifest rows atomically as `part-<hash of their inputs>.parquet` in `parts_dir`
    (a retried batch replaces its part, never duplicates it)."""
    if not len(rows["input"]):
        return
    fs, root = split_uri(parts_dir)
    layer.write_parquet_atomic(fs, f"{root}/{layer.content_part_name(rows['input'])}", manifest_table(rows))


def read_manifest_parts(parts_dir: str):
    """Every committed manifest part under `parts_dir` as one table (a killed run's record)."""
    fs, root = split_uri(parts_dir)
    tables = []
    for path in layer.list_parts(fs, root):
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f).cast(manifest_schema()))
    return pa.concat_tables(tables) if tables else manifest_schema().empty_table()


def consolidate_manifest(parts_dir: str, uri: str) -> Dict[str, int]:
    """The manifest parts under `parts_dir` streamed into one Parquet file at `uri` (one row per
    input, columns MANIFEST_COLUMNS), written atomically; one part in memory at a time. Returns
    the row counts by status."""
    fs, root = split_uri(parts_dir)
    parts = layer.list_parts(fs, root)
    counts: Dict[str, int] = {}

    def write(stream):
        with pq.ParquetWriter(stream, manifest_schema()) as writer:
            for path in parts:
                with fs.open_input_file(path) as f:
                    table = pq.read_table(f).cast(manifest_schema())
                writer.write_table(table)
                for item in pc.value_counts(table.column("status")).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    manifest_fs, path = split_uri(uri)
    layer.atomic_write(manifest_fs, path, write)
    return counts
