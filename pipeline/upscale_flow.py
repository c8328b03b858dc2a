"""The bulk upscale job's dataflow in Ray Data, from a streamed listing to the manifest.

list (driver, a folder at a time) -> listing chunks in OUT/TMP_DIR, planned per folder ->
[plan a Parquet list per folder key] -> probe headers, skip valid outputs (CPU tasks; finished
rows become manifest parts, pending rows pending parts) -> sort by output-size bucket -> read +
decode (CPU tasks) -> upscale (actor pool, model loaded once per actor) -> encode + atomic write
(CPU tasks, each batch committing its manifest part). Decoding and writing run as separate
stages, so they overlap the accelerator's work. The driver holds counters and one path per
pending part, never rows. Stages: `pipeline.upscale_stages`; config: `pipeline.upscale_config`.

`start_run` -> `probe_listing` -> `upscale_pending` -> `finish_run`: the job (`jobs.upscale`)
starts Ray between the first two and owns the output's lease throughout.
"""
from __future__ import annotations

import logging
import math
import time
from typing import List, NamedTuple, Optional, Tuple

from pipeline import output as out
from pipeline.listing import ListingUnits
from pipeline.logs import Progress
from pipeline.inputs import ERROR, OK, PENDING, SKIPPED, UNSUPPORTED, Listing, split_uri
from pipeline.naming import MANIFEST_NAME, PARTS_DIR, plan_batch, tmp_root, write_listing
from pipeline.storage import join_uri
from pipeline.upscale_config import UpscaleJobConfig
from pipeline.upscale_manifest import consolidate_manifest
from pipeline.upscale_stages import (MIXED_BUCKETS, ArrowUpscaleStage, arrow, decode_batch, probe_and_commit,
                                     write_and_count)


# rows per probe unit (and per pending part): the driver holds a path per pending part, so
# 10^8 inputs are ~100k paths (~10 MB); a unit probes in ~0.15 s
PROBE_BLOCK = 1024
SHUFFLE_PARTITION_ROWS, MAX_SHUFFLE_PARTITIONS = 20_000, 1000  # the sort by output size and the plan of a list
LISTING_CHUNK_ROWS = 50_000  # listed inputs per listing chunk: the listing never sits whole in the driver
IO_BATCH = 4  # rows per decode / write task call
STEADY_MIN_FACTOR = 3  # report a steady rate only with this many times the first batch's rows

log = logging.getLogger("flowsr")


class Listed(NamedTuple):
    """The listing chunks of a run: their paths, row counts, and whether their rows are planned
    (a folder's listing; a Parquet list's rows are planned per folder key in Ray Data)."""

    paths: List[str]
    rows: List[int]
    planned: bool


def manifest_uri(cfg: UpscaleJobConfig) -> str:
    return cfg.manifest or join_uri(cfg.output, MANIFEST_NAME)


def parts_dir(cfg: UpscaleJobConfig) -> str:
    return join_uri(cfg.output, PARTS_DIR)


def pending_dir(cfg: UpscaleJobConfig) -> str:
    return join_uri(tmp_root(cfg.output), "pending")


def _remove_dir(uri: str) -> None:
    """Remove the folder at `uri` and what it holds, if it exists (the job's own folders under OUT)."""
    out.remove_dir(*split_uri(uri))


def start_run(cfg: UpscaleJobConfig, listing: Listing) -> Listed:
    """Clear what an earlier run left (its temporary folder, a killed run's manifest parts: this
    run probes their outputs again, and a finished run's manifest: only a finished run leaves
    one), then stream `listing` into listing chunks (`pipeline.naming.write_listing`)."""
    _remove_dir(tmp_root(cfg.output))
    _remove_dir(parts_dir(cfg))
    out.remove_file(manifest_uri(cfg))
    return Listed(*write_listing(listing, join_uri(tmp_root(cfg.output), "listing"), cfg.output, cfg.format,
                                 cfg.name_suffix, LISTING_CHUNK_ROWS))


def finish_run(cfg: UpscaleJobConfig) -> dict:
    """Consolidate the manifest parts into the manifest, remove the parts and the temporary
    folder; returns the counts by status (ok, skipped, error, unsupported)."""
    counts = consolidate_manifest(parts_dir(cfg), manifest_uri(cfg))
    _remove_dir(parts_dir(cfg))
    _remove_dir(tmp_root(cfg.output))
    return {s: counts.get(s, 0) for s in (OK, SKIPPED, ERROR, UNSUPPORTED)}


def _partitions(rows: int) -> int:
    """Partitions for a shuffle of `rows` rows (Ray's default, 200, is for big data)."""
    return max(1, min(MAX_SHUFFLE_PARTITIONS, math.ceil(rows / SHUFFLE_PARTITION_ROWS)))


def probe_listing(cfg: UpscaleJobConfig, listed: Listed) -> Tuple[List[Tuple[str, int]], bool]:
    """Listing chunks -> [plan per folder key] -> probe (Ray tasks): finished rows become manifest
    parts, pending rows pending parts (OUT/.flowsr-tmp/pending). Returns the pending parts as
    (path, rows) pairs (one per probe unit of PROBE_BLOCK inputs, not one per input) and whether
    their rows fall in more than one output-size bucket."""
    import ray

    fs, _ = split_uri(cfg.output)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    ds = ListingUnits(fs, listed.paths, listed.rows, PROBE_BLOCK).rows_dataset(cluster_cpus)
    if not listed.planned:  # a Parquet list: names compete within a folder, so plan folder by folder
        plan = arrow(plan_batch, output_root=cfg.output, fmt=cfg.format, suffix=cfg.name_suffix)
        ds = ds.groupby("key", num_partitions=_partitions(sum(listed.rows))).map_groups(plan, batch_format="pyarrow")
        ds = ds.repartition(target_num_rows_per_block=PROBE_BLOCK)
    ds = ds.map_batches(arrow(probe_and_commit, parts_dir=parts_dir(cfg), pending_dir=pending_dir(cfg),
                              bucket=cfg.bucket, scale=cfg.scale, resume=not cfg.overwrite, max_pixels=cfg.max_pixels,
                              max_output_pixels=cfg.max_output_pixels, max_bytes=cfg.max_bytes),
                        batch_format="pyarrow", batch_size=None)  # a unit (a block) at a time, in the reading task
    counts = dict.fromkeys((PENDING, SKIPPED, ERROR, UNSUPPORTED), 0)
    pending, first_bucket, mixed = [], None, False
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for status in counts:
            counts[status] += sum(batch.column(status).to_pylist())
        for path, rows, key in zip(*(batch.column(c).to_pylist()
                                     for c in ("pending_part", "pending_rows", "pending_bucket"))):
            if rows:
                pending.append((path, rows))
                first_bucket = first_bucket or key
                mixed = mixed or key != first_bucket or key == MIXED_BUCKETS
    log.info("upscale: %d to do, %d skipped (valid output), %d errors, %d unsupported", *counts.values())
    return pending, mixed


def upscale_pending(cfg: UpscaleJobConfig, pending: List[Tuple[str, int]], *, sort: bool = True,
                    num_gpus: float = 0, num_cpus: float = 1.0) -> Optional[float]:
    """The `pending` parts ((path, rows) pairs), ordered by output-size bucket (a Ray Data sort,
    when there is more than one batch and `sort`: their rows fall in more than one bucket),
    through decode -> upscale (`cfg.pool_size` actors of `num_gpus` GPUs and `num_cpus` CPUs) ->
    write, each write batch committing its manifest part. The driver sees one row of counts per
    batch. Returns the steady rate: rows/s from the first finished batch to the last (startup
    excluded), or None when too few batches followed the first."""
    import ray

    fs, _ = split_uri(pending_dir(cfg))
    paths, rows = [p for p, _ in pending], [n for _, n in pending]
    todo = sum(rows)
    ds = ListingUnits(fs, paths, rows, PROBE_BLOCK).rows_dataset(ray.cluster_resources().get("CPU", 1))
    if sort and todo > cfg.batch_size:  # one batch needs no order
        ds.context.default_hash_shuffle_parallelism = _partitions(todo)  # this dataset's own context
        ds = ds.sort(["bucket_h", "bucket_w", "input"])
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(arrow(decode_batch, max_pixels=cfg.max_pixels), batch_format="pyarrow", batch_size=IO_BATCH)
    stage_kwargs = {**cfg.upscaler_options(), "fail_after": cfg.fail_after}
    ds = ds.map_batches(ArrowUpscaleStage, fn_constructor_args=(cfg.checkpoint,), fn_constructor_kwargs=stage_kwargs,
                        batch_format="pyarrow", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.pool_size), num_gpus=num_gpus, num_cpus=num_cpus)
    ds = ds.map_batches(arrow(write_and_count, output_root=cfg.output, parts_dir=parts_dir(cfg)),
                        batch_format="pyarrow", batch_size=IO_BATCH)
    progress = Progress("upscale", todo, logger=log)
    first = None
    done = errors = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok, failed = sum(batch.column(OK).to_pylist()), sum(batch.column(ERROR).to_pylist())
        done, errors = done + ok + failed, errors + failed
        first = first or (time.perf_counter(), done)
        progress.update(done, f"{errors} errors")
    if first is None or done < STEADY_MIN_FACTOR * first[1]:
        return None  # too few batches after the first one to say
    return round((done - first[1]) / (time.perf_counter() - first[0]), 3)
