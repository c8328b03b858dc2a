"""The data stage on Ray Data: listed files -> (HR, LR) pair shards, error rows and a manifest.

Plan: the listing (streamed into `_work/` Parquet chunks, cut into units of `files_per_task`
files) -> [read, digest, skip finished, decode, crop, degrade, template captions] (Ray tasks,
about four per cluster CPU, each working through a run of units and passing each unit's pairs
on as it goes) -> [write one shard per `shard_rows` rows]. Layout of the output (written through
`pipeline.output`):

    _run.json                   run record: the settings that define the pairs; a rerun must match
    _lease.json                 held while a run writes; a second concurrent run refuses
    shards/part-<hash>.parquet  PAIR_SCHEMA rows (pipeline/schema.py), at most shard_rows each
    errors/part-<hash>.parquet  ERROR_SCHEMA rows: one per file that failed or is unsupported
    manifest.json               every committed shard with its row count, and totals

Resume: every part is committed atomically (dot-prefixed temp file, then rename); a killed run
leaves no partial shard. A rerun builds a hash-partitioned index of the finished sample_ids
(and errored source_uris) inside Ray Data from the committed parts; each task skips the crops
(and files) found there. Delete errors/ to retry failed files.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import cv2
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import names
from pipeline import output as out
from pipeline.done_index import DoneIndex, EMPTY_INDEX
from pipeline.listing import ListingUnits, rows_of_runs, write_listing_chunks
from pipeline import shards as pair_shards
from pipeline.caption import CaptionConfig, add_caption_stage, caption_table
from pipeline.degrade import PARAMS_VERSION
from pipeline.pairs import PrepareConfig, SourceReader, error_row, pairs_table, process_uri
from pipeline.schema import ERROR_SCHEMA, PAIR_SCHEMA, dataset_card
from pipeline.storage import resolve_fs

SHARDS_DIR, ERRORS_DIR, WORK_DIR = pair_shards.SHARDS_DIR, "errors", "_work"
ERRORS_FILE, MANIFEST_FILE = ERRORS_DIR, "manifest.json"  # errors: a directory of parts
WORK_CHUNK_ROWS = 50_000  # listed files per `_work` chunk: the listing never sits whole in memory
WORK_SCHEMA = pa.schema([("source_uri", pa.string()), ("reject", pa.string())])


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------

def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def write_shard(table: pa.Table, output: str) -> Optional[Dict[str, Any]]:
    """Commit one shard of pair rows under output/shards; its {"shard", "rows"} or None if empty."""
    return pair_shards.write_shard(table, output, PARAMS_VERSION)


def write_errors(rows: List[Dict[str, str]], output: str) -> None:
    """Commit error rows as one part of output/errors (named by their sources)."""
    if rows:
        fs, root = resolve_fs(output)
        name = out.content_part_name(r["source_uri"] for r in rows)
        out.write_parquet_atomic(fs, _join(root, ERRORS_DIR, name),
                                 pa.Table.from_pylist(rows, schema=ERROR_SCHEMA))


# ---------------------------------------------------------------------------------------------
# Ray Data adapters (thin: the work is in the functions above)
# ---------------------------------------------------------------------------------------------

def degrade_batch(batch: pa.Table, cfg: Dict[str, Any], reader: SourceReader,
                  shards_done: DoneIndex = EMPTY_INDEX,
                  errors_done: DoneIndex = EMPTY_INDEX) -> pa.Table:
    """Batch of listed files {source_uri, reject} -> pair rows; its bad files go to output/errors.

    `cfg`: `asdict` of a PrepareConfig; `reader` reads the files. Files with an error row
    already (`errors_done`) and crops already in a shard (`shards_done`) are skipped.
    """
    cv2.setNumThreads(1)  # a Ray task holds one CPU; OpenCV would otherwise start a thread per core
    config = PrepareConfig(**cfg)
    items = batch.to_pylist()
    recorded = errors_done.done([item["source_uri"] for item in items])
    pairs, errors = [], []
    for item, has_error in zip(items, recorded):
        if has_error:
            continue
        if item.get("reject"):
            errors.append(error_row(item["source_uri"], "unsupported", item["reject"]))
            continue
        rows, error = process_uri(item["source_uri"], config, reader, shards_done)
        pairs.extend(rows)
        if error is not None:
            errors.append(error)
    write_errors(errors, config.output)
    return pairs_table(pairs)


def add_captions(ds, captioner: str):
    """The caption stage of `pipeline.caption` (qwen2vl: its GPU actor pool)."""
    return add_caption_stage(ds, CaptionConfig(backend=captioner))


def degrade_units(batch: pa.Table, listing: ListingUnits, runs: int, cfg: Dict[str, Any],
                  reader: SourceReader, shards_done: DoneIndex = EMPTY_INDEX,
                  errors_done: DoneIndex = EMPTY_INDEX) -> Iterator[pa.Table]:
    """Batch of run numbers {id} -> the pairs of each unit of those runs (`degrade_batch` on the
    unit's files), unit by unit.

    With a CPU captioner (template) or none, the task captions and writes them itself: it yields
    the SHARD_SCHEMA row of each shard of `shard_rows` pairs as it commits it. With qwen2vl it
    yields the pair rows, for the captioner's actor pool and the writer stage after it.
    """
    config = PrepareConfig(**cfg)
    tables = (degrade_batch(files, cfg, reader, shards_done, errors_done)
              for files in rows_of_runs(batch, listing, runs))
    if config.captioner == "qwen2vl":
        yield from tables
        return
    if config.captioner != "off":
        captions = CaptionConfig(backend=config.captioner)
        tables = (caption_table(table, captions) for table in tables)
    yield from pair_shards.write_shards(tables, config.output, PARAMS_VERSION, config.shard_rows)


def degrade_runs(listing: ListingUnits, cfg: PrepareConfig, cluster_cpus: float) -> int:
    """Degrade tasks (runs of units): `listing.runs`, but when the job writes its shards in the
    degrade tasks no more than it takes to fill shards of `shard_rows` pairs (a task's last shard
    is short), while keeping one task per CPU (or per `num_workers`)."""
    runs = listing.runs(cluster_cpus)
    if cfg.captioner == "qwen2vl":
        return runs
    pairs = sum(listing.rows) * cfg.crops_per_image  # at most; done and failed files make fewer
    slots = cfg.num_workers or max(1, int(cluster_cpus))
    return min(runs, max(slots, -(-pairs // cfg.shard_rows)))


def build_dataset(listing: ListingUnits, cfg: PrepareConfig, reader: SourceReader,
                  shards_done: DoneIndex = EMPTY_INDEX, errors_done: DoneIndex = EMPTY_INDEX):
    """The listing, `files_per_task` files a unit -> a Ray Dataset of written shards ({shard, rows}).
    `reader` reads the files in the tasks.

    Without a GPU captioner it is a single operator: a run of units per task (no batch size, so
    the read of the run numbers fuses with it), each task degrading, captioning and writing its
    pairs as it goes. No writer actor: an actor pool's start (its worker process, and Ray Data's
    actor-location tracker, which holds up the first tasks) cost ~1 s of a 3 s small job.
    """
    import ray

    compute = ray.data.TaskPoolStrategy(size=cfg.num_workers) if cfg.num_workers else None
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    runs = degrade_runs(listing, cfg, cluster_cpus)
    ds = listing.dataset(runs).map_batches(
        degrade_units, fn_kwargs={"listing": listing, "runs": runs, "cfg": asdict(cfg),
                                  "reader": reader, "shards_done": shards_done, "errors_done": errors_done},
        batch_size=None, batch_format="pyarrow", compute=compute)
    if cfg.captioner == "qwen2vl":
        ds = add_captions(ds, cfg.captioner)
        return pair_shards.add_shard_writer(ds, cfg.output, PARAMS_VERSION, cfg.shard_rows, cluster_cpus)
    # One operator, whose output is a row per shard: Ray Data's per-operator reservation (there
    # to share CPUs and object store among operators) only held it to one task at a time until
    # its first task had finished (measured: a CPU idle for the first second on 2 CPUs).
    ds.context.op_resource_reservation_enabled = False  # this dataset's own context
    return ds


# ---------------------------------------------------------------------------------------------
# Output state: the work listing, counts, the manifest
# ---------------------------------------------------------------------------------------------

def write_work_units(output: out.Output, files: Iterable[Tuple[str, Optional[str]]],
                     files_per_task: int) -> ListingUnits:
    """Stream the listed (uri, reject reason or None) into `_work/listing-NNNNN.parquet` chunks
    (WORK_SCHEMA), cut into units of `files_per_task` files; the listing is never held whole."""
    directory = output.path(WORK_DIR)
    output.fs.delete_dir_contents(directory, missing_dir_ok=True)
    rows = ({"source_uri": names.to_text(uri), "reject": reject}  # a name that is not UTF-8: a file:// URI
            for uri, reject in files)
    chunks, counts = write_listing_chunks(output.fs, directory, rows, WORK_SCHEMA, WORK_CHUNK_ROWS)
    return ListingUnits(output.fs, chunks, counts, files_per_task)


def count_rows(fs: pafs.FileSystem, root: str, directory: str) -> Tuple[List[str], int]:
    parts = out.list_parts(fs, _join(root, directory))
    return parts, sum(out.part_rows(fs, parts))


def count_failed(fs: pafs.FileSystem, root: str) -> int:
    """Error rows of files that failed (every stage but `unsupported`: a file that is not an
    image by its extension is not a failure), read a part's `stage` column at a time."""
    failed = 0
    for path in out.list_parts(fs, _join(root, ERRORS_DIR)):
        with fs.open_input_file(path) as f:
            stages = pq.read_table(f, columns=["stage"]).column("stage")
        failed += len(stages) - stages.to_pylist().count("unsupported")
    return failed


def write_manifest(fs: pafs.FileSystem, root: str, cfg: PrepareConfig) -> Dict[str, Any]:
    """manifest.json: every committed shard (path relative to the output) and its row count."""
    shards = out.list_parts(fs, _join(root, SHARDS_DIR))
    rows = out.part_rows(fs, shards)
    _, n_errors = count_rows(fs, root, ERRORS_DIR)
    manifest = {"format": "flowsr-pairs", "schema": PAIR_SCHEMA.names,
                "settings": cfg.data_settings(),
                "shards": [{"path": f"{SHARDS_DIR}/{p.rsplit('/', 1)[-1]}", "rows": n}
                           for p, n in zip(shards, rows)],
                "total_rows": sum(rows),
                "errors": {"path": ERRORS_DIR, "rows": n_errors, "failed": count_failed(fs, root)}}
    out.write_json_atomic(fs, _join(root, MANIFEST_FILE), manifest)
    card = dataset_card(f"{SHARDS_DIR}/*.parquet", scale=cfg.scale, params_version=PARAMS_VERSION)
    out.write_bytes_atomic(fs, _join(root, "README.md"), card.encode())
    return manifest


def read_errors(output: str) -> pa.Table:
    """All error rows of an output (ERROR_SCHEMA)."""
    fs, root = resolve_fs(output)
    tables = []
    for path in out.list_parts(fs, _join(root, ERRORS_DIR)):
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f).cast(ERROR_SCHEMA))
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()
