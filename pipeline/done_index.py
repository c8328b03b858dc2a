"""Resume state read from committed parts: the finished ids of an output, as a `DoneIndex`.

`build_done_index` reads the id column of an output's committed parts inside Ray Data and
hash-partitions it into bucket files of about `rows_per_bucket` ids each (under `_resume/`); a task
asks `index.done(ids)` and loads only the buckets of those ids. Neither the driver nor a task
ever holds every finished id.
"""
from __future__ import annotations

import functools
import uuid
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output import PARQUET_SUFFIX, Output, part_rows, write_parquet_atomic
from pipeline.storage import is_local, resolve_fs

INDEX_DIR = "_resume"  # bucket files of finished ids, rebuilt by every run that resumes
ROWS_PER_BUCKET = 50_000  # finished ids per DoneIndex bucket file (~1 MB)


def id_bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    """Bucket of each id string (crc32 mod `buckets`): the same in every process."""
    return np.fromiter((zlib.crc32(s.encode()) % buckets for s in ids.to_pylist()), np.int64,
                       count=len(ids))


def _bucket_ids(batch: pa.Table, column: str, buckets: int) -> pa.Table:
    ids = batch.column(column).combine_chunks()
    return pa.table({"id": ids, "bucket": pa.array(id_bucket(ids, buckets))})


def _write_bucket(group: pa.Table, fs_uri: str, directory: str) -> pa.Table:
    fs, _ = resolve_fs(fs_uri)
    bucket = int(group.column("bucket")[0].as_py())
    ids = pc.unique(group.column("id"))
    write_parquet_atomic(fs, f"{directory}/bucket-{bucket:06d}{PARQUET_SUFFIX}",
                         pa.table({"id": ids}), row_group_size=1 << 20)
    return pa.table({"bucket": [bucket], "ids": [len(ids)]})


@dataclass(frozen=True)
class DoneIndex:
    """Finished ids of an output, as `buckets` Parquet files under `directory` (a URI).

    `done(ids)` loads only the buckets those ids fall in (a few cached per process).
    """

    directory: str
    buckets: int

    def done(self, ids: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of `ids` are finished."""
        if self.buckets == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        array = pa.array(list(ids), pa.string())
        where = id_bucket(array, self.buckets)
        mask = np.zeros(len(ids), bool)
        for bucket in np.unique(where):
            members = _load_bucket(self.directory, int(bucket))
            rows = np.flatnonzero(where == bucket)
            found = pc.is_in(array.take(pa.array(rows)), value_set=members).to_numpy(zero_copy_only=False)
            mask[rows] = found
        return mask


EMPTY_INDEX = DoneIndex(directory="", buckets=0)


@functools.lru_cache(maxsize=8)
def _load_bucket(directory: str, bucket: int) -> pa.Array:
    fs, root = resolve_fs(directory)
    path = f"{root}/bucket-{bucket:06d}{PARQUET_SUFFIX}"
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f).column("id").combine_chunks()
    except FileNotFoundError:  # no finished id fell in this bucket
        return pa.array([], pa.string())


def build_done_index(output: Output, parts: Sequence[str], column: str, name: str,
                     rows_per_bucket: int = ROWS_PER_BUCKET) -> DoneIndex:
    """The `column` ids of committed `parts` (paths on output.fs) as a DoneIndex, via Ray Data.

    The ids go from the parts' id column through a hash shuffle (Ray Data groupby) into bucket
    files under `_resume/<name>/<run>`; the driver only sees one small row per bucket. Up to
    `rows_per_bucket` ids make one bucket, written directly (bounded by that size).
    """
    if not parts:
        return EMPTY_INDEX
    total = sum(part_rows(output.fs, parts))
    if total == 0:
        return EMPTY_INDEX
    buckets = max(1, -(-total // rows_per_bucket))
    output.fs.delete_dir_contents(output.path(INDEX_DIR, name), missing_dir_ok=True)
    directory = output.path(INDEX_DIR, name, uuid.uuid4().hex[:12])
    output.fs.create_dir(directory, recursive=True)
    fs_uri = output.uri if not is_local(output.uri) else "/"
    if buckets == 1:  # at most rows_per_bucket ids: one bucket, written here without a shuffle
        tables = []
        for path in parts:
            with output.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f, columns=[column]).rename_columns(["id"]))
        ids = pa.concat_tables(tables).column("id").combine_chunks()
        _write_bucket(pa.table({"id": ids, "bucket": pa.array(np.zeros(len(ids), np.int64))}),
                      fs_uri, directory)
        return DoneIndex(directory=_index_uri(output, directory), buckets=1)
    import ray

    ds = ray.data.read_parquet(list(parts), filesystem=output.fs, columns=[column])
    ds = ds.map_batches(_bucket_ids, fn_kwargs={"column": column, "buckets": buckets},
                        batch_format="pyarrow")
    ds = ds.groupby("bucket").map_groups(_write_bucket, batch_format="pyarrow",
                                         fn_kwargs={"fs_uri": fs_uri, "directory": directory})
    ds.materialize()
    return DoneIndex(directory=_index_uri(output, directory), buckets=buckets)


def _index_uri(output: Output, directory: str) -> str:
    if is_local(output.uri):
        return directory
    return f"{output.uri.split('://', 1)[0]}://{directory}"

