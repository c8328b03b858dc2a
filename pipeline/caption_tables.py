"""Caption tables: CAPTION_SCHEMA rows keyed by `sample_id`, one Parquet part per pair shard.

`caption_shards` is the Ray Data stage of `jobs.caption` (caption whole pair shards, commit one
part each; a rerun finds the finished shards by listing the parts), and `join_captions` replaces
a pair table's caption columns by a caption table's.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from pipeline import output as out
from pipeline.caption import CaptionConfig, Captioner, actor_pool, required_columns
from pipeline.schema import CAPTION_COLUMNS, CAPTION_SCHEMA
from pipeline.storage import resolve_fs

PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"  # pyarrow and Ray skip dot-files, so an unfinished part is never read


def caption_part_paths(uri: str) -> List[str]:
    """Finished part files of a caption table (sorted); [] when the directory does not exist."""
    filesystem, root = resolve_fs(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and i.base_name.startswith(PART_PREFIX)
                  and i.base_name.endswith(".parquet"))


def read_caption_table(uri: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """All finished parts of a caption table as one CAPTION_SCHEMA table (empty when none)."""
    filesystem, _ = resolve_fs(uri)
    schema = CAPTION_SCHEMA if columns is None else pa.schema([CAPTION_SCHEMA.field(c) for c in columns])
    tables = [pq.read_table(p, filesystem=filesystem, columns=schema.names, schema=schema)
              for p in caption_part_paths(uri)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def write_caption_part(table: pa.Table, uri: str, name: str) -> str:
    """Commit `table` (CAPTION_SCHEMA) as part `name` atomically: temp dot-file, then rename."""
    filesystem, root = resolve_fs(uri)
    final = f"{root}/{PART_PREFIX}{name}.parquet"
    out.write_parquet_atomic(filesystem, final, table.select(CAPTION_SCHEMA.names).cast(CAPTION_SCHEMA),
                             row_group_size=1 << 14)
    return final


def caption_part_name(shard_path: str, shard_size: int) -> str:
    """The caption part of one pair shard: named by the shard's path and size, so a rerun finds
    which shards are done by listing the parts (no per-row state)."""
    return hashlib.sha1(f"{shard_path}|{shard_size}".encode()).hexdigest()[:24]


def pair_shard_paths(uri: str) -> List[str]:
    """Parquet files under `uri` holding pair rows (sample_id + hr), sorted; dot/underscore files skipped."""
    filesystem, root = resolve_fs(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith((".", "_")))
    return [p for p in paths
            if {"sample_id", "hr"} <= set(pq.read_schema(p, filesystem=filesystem).names)]


def plan_parts(shards_uri: str, output: out.Output) -> Dict:
    """{shard path -> part name} of every pair shard under `shards_uri`, and which parts of the
    caption table `output` are committed already."""
    filesystem, root = resolve_fs(shards_uri)
    paths = pair_shard_paths(shards_uri)
    if not paths:
        raise FileNotFoundError(f"no pair shards (Parquet with sample_id and hr) under {shards_uri}")
    sizes = {i.path: i.size for i in filesystem.get_file_info(paths)}
    base = root if filesystem.get_file_info(root).type == pafs.FileType.Directory else os.path.dirname(root)
    parts = {p: caption_part_name(os.path.relpath(p, base), sizes[p]) for p in paths}
    done = {path.rsplit("/", 1)[-1][len(PART_PREFIX):-len(out.PARQUET_SUFFIX)]
            for path in out.list_parts(output.fs, output.root)}
    return {"parts": parts, "done": done, "filesystem": filesystem}


PART_INFO_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64())])


class ShardCaptioner:
    """Caption whole pair shards: batch of {shard, part} -> {part, rows}, each part committed.

    A shard is read `batch_size` rows at a time (only the backend's columns), captioned by a
    `Captioner` built once, and its CAPTION_SCHEMA rows committed as one part file. A killed
    run leaves whole parts only; memory is bounded by one batch of images plus one shard's text.
    """

    def __init__(self, cfg: Dict[str, Any] | CaptionConfig, output: str, shards_uri: str, backend=None):
        self.captioner = Captioner(cfg, backend=backend)
        self.output, self.shards_uri = output, shards_uri

    def caption_shard(self, shard_path: str, part: str) -> int:
        cfg = self.captioner.cfg
        filesystem, _ = resolve_fs(self.shards_uri)
        columns = list(dict.fromkeys(("sample_id",) + required_columns(cfg)))
        pieces = []
        with filesystem.open_input_file(shard_path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=cfg.batch_size, columns=columns):
                batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False)
                         for name in record_batch.schema.names}
                captioned = self.captioner(batch)
                pieces.append(pa.table({name: pa.array(list(captioned[name]), CAPTION_SCHEMA.field(name).type)
                                        for name in CAPTION_SCHEMA.names}, schema=CAPTION_SCHEMA))
        table = pa.concat_tables(pieces) if pieces else CAPTION_SCHEMA.empty_table()
        write_caption_part(table, self.output, part)
        return table.num_rows

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = [self.caption_shard(shard, part) for shard, part in zip(batch["shard"], batch["part"])]
        return {"part": np.array(list(batch["part"]), dtype=object), "rows": np.array(rows, np.int64)}


def caption_shards_task(batch: Dict[str, np.ndarray], cfg: Dict[str, Any], output: str,
                        shards_uri: str) -> Dict[str, np.ndarray]:
    """Stateless form of `ShardCaptioner` (template backend) for a plain Ray task map."""
    return ShardCaptioner(cfg, output, shards_uri)(batch)


def caption_shards(ds, cfg: CaptionConfig, output: str, shards_uri: str):
    """Ray Data adapter: rows {shard, part} -> {part, rows}, one committed part per shard.
    qwen2vl runs on an actor pool (model loaded once per actor)."""
    if cfg.backend == "template":
        return ds.map_batches(caption_shards_task, batch_size=1, batch_format="numpy",
                              fn_kwargs={"cfg": asdict(cfg), "output": output, "shards_uri": shards_uri})
    if cfg.backend == "qwen2vl":
        return ds.map_batches(ShardCaptioner, batch_size=1, batch_format="numpy",
                              fn_constructor_kwargs={"cfg": asdict(cfg), "output": output,
                                                     "shards_uri": shards_uri},
                              num_gpus=cfg.num_gpus, compute=actor_pool(cfg))
    raise ValueError(f"backend {cfg.backend!r} has no captioner")


def replace_captions(pairs: pa.Table, captions: pa.Table) -> pa.Table:
    """`pairs` with its caption columns taken from `captions` by sample_id (row order kept).

    Rows whose sample_id is not in `captions` get null captions.
    """
    index = pc.index_in(pairs["sample_id"], value_set=captions["sample_id"])
    out = pairs.drop_columns([c for c in CAPTION_COLUMNS if c in pairs.column_names])
    for name in CAPTION_COLUMNS:
        out = out.append_column(CAPTION_SCHEMA.field(name), captions[name].take(index))
    return out


def _replace_captions_batch(batch: pa.Table, captions_ref) -> pa.Table:
    import ray

    return replace_captions(batch, ray.get(captions_ref))


def join_captions(pairs, caption_table_uri: str, num_cpus: Optional[float] = None):
    """Replace the caption columns of `pairs` (pyarrow Table or Ray Dataset) by a caption table's.

    The caption table is small (text only), so it is broadcast to every batch rather than
    shuffled; rows missing from it get null captions. Returns the same kind as `pairs`.
    `num_cpus`: logical CPUs of each Ray task (default: Ray Data's).
    """
    captions = read_caption_table(caption_table_uri)
    if isinstance(pairs, pa.Table):
        return replace_captions(pairs, captions)
    import ray

    return pairs.map_batches(_replace_captions_batch, fn_kwargs={"captions_ref": ray.put(captions)},
                             batch_format="pyarrow", batch_size=None, num_cpus=num_cpus)
