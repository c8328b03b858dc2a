"""The evaluation's output: its run record, the per-image results committed as Parquet parts,
resume, and the summary computed from every part.

OUT/results/part-<hash of their ids>.parquet holds one evaluated batch each (sample_id,
"<method>/<metric>" float64, the per-image winners "best_psnr" / "best_ssim", `error`), written
atomically as the batch finishes, so a killed run resumes with the pairs that have none
(`drop_done`). The run record (`pipeline.output.run_record`) names the inputs (file names and
sizes), the settings that change results and the models' digests. `summarize` streams the parts
in sample_id order into per_image.csv, the tables, the report and summary.json: the same numbers
whichever run committed which part.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flowsr.metrics import PAPER_METRICS, MetricSuite
from pipeline.evaluation import ERROR_COLUMN, WINNER_COLUMNS, WINNER_METRICS, EvalConfig, safe_name
from pipeline.done_index import DoneIndex
from pipeline.fingerprint import checkpoint_digest
from pipeline.output import (Output, OutputError, atomic_write, content_part_name, list_parts, part_rows, path_inside,
                             run_record, write_json_atomic, write_parquet_atomic)
from pipeline.report import table1, table1_markdown, write_csv, write_report, write_text
from pipeline.storage import resolve_fs

RESULTS_DIR = "results"  # per-image metric parts under OUT, one committed per evaluated batch
DRIVER_SORT_ROWS = 100_000  # up to this many result rows are sorted on the driver, more by Ray Data
SUMMARY_BATCH_ROWS = 4096  # result rows per step of the summary pass (fixed: the sums do not depend on the parts)
LISTED_MAX = 1000  # failed pairs and unmatched names named in summary.json and the report (all are counted)
PART_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64())])
SUMMARY_FILES = ("table1.md", "table1.csv", "per_image.csv", "summary.json", "report.html")


# ---- run record --------------------------------------------------------------------------------------
def _listing_digest(uri: Optional[str], digest) -> None:
    """Adds every file under `uri` (relative name and size, sorted; for a file its name and size)
    to `digest`; dot- and underscore-files (temporaries, leases, run records) are left out, as
    Parquet readers do. The folder's own name and place are not part of it."""
    if not uri:
        digest.update(b"-\n")
        return
    fs, root = resolve_fs(uri)
    info = fs.get_file_info(root)
    infos = [info] if info.type == pafs.FileType.File else \
        fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    entries = sorted(f"{os.path.relpath(i.path, root) if i is not info else i.base_name}|{i.size}"
                     for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
    digest.update(f"{len(entries)}\n".encode())
    for entry in entries:
        digest.update(entry.encode() + b"\n")


def input_fingerprint(cfg: EvalConfig) -> str:
    """Identity of the evaluated inputs: the names and sizes of the files of the pairs (shards, or HR
    and LR folders) and of every SR folder. A moved copy keeps it; other data changes it."""
    digest = hashlib.sha256()
    for uri in (cfg.data, cfg.lr_dir, *(path for _, path in cfg.sr)):
        _listing_digest(uri, digest)
    return digest.hexdigest()[:16]


def _model_digest(model: str) -> str:
    try:
        return checkpoint_digest(model)[:16]
    except (OutputError, OSError):  # not a file or folder here (the loader resolves it): its name
        return model


def result_params(cfg: EvalConfig, scored_metrics: Sequence[str]) -> Dict:
    """The settings that change the per-image results: a rerun with others is refused."""
    return {"inputs": input_fingerprint(cfg), "limit": cfg.limit, "scale": cfg.scale,
            "methods": [key for key, _, _ in cfg.methods()],
            "steps": list(cfg.steps) if cfg.checkpoint else [], "seed": cfg.seed, "weights": cfg.weights,
            "pretrained": cfg.pretrained, "color_fix": cfg.color_fix, "tile": cfg.tile,
            "baselines": {name: _model_digest(model) for name, model in cfg.baselines},
            "metrics": sorted(scored_metrics)}


def eval_record(cfg: EvalConfig, scored_metrics: Sequence[str]) -> Dict:
    """OUT's run record (`pipeline.output`): inputs, result settings, checkpoint digest, code version."""
    inputs = {"data": cfg.data, "lr_dir": cfg.lr_dir, "sr": dict(cfg.sr)}
    return run_record("evaluate", inputs, result_params(cfg, scored_metrics), checkpoint_digest(cfg.checkpoint))


# ---- committed result parts ------------------------------------------------------------------------
def drop_done(batch: pa.Table, done: DoneIndex) -> pa.Table:
    """The pairs of `batch` whose results are not committed yet."""
    finished = done.done([str(s) for s in batch.column("sample_id").to_pylist()])
    return batch.filter(pa.array(~finished)) if finished.any() else batch


def best_method(row: Mapping, keys: Sequence[str], metric: str) -> str:
    """The method key with the highest `metric` in a per-image row (the first of equals; "" if none)."""
    scores = [(row.get(f"{k}/{metric}", np.nan), k) for k in keys]
    scores = [(v, k) for v, k in scores if np.isfinite(v)]
    return max(scores, key=lambda s: s[0])[1] if scores else ""


def results_table(batch: Mapping[str, np.ndarray], keys: Sequence[str]) -> pa.Table:
    """PairEvaluator's batch -> a table of sample_id, "<method>/<metric>" (float64) and the
    per-image winners "best_psnr" / "best_ssim" among the method `keys`."""
    ids = [str(s) for s in batch["sample_id"]]
    columns = {"sample_id": pa.array(ids, pa.string())}
    metrics = sorted(k for k in batch if k not in ("sample_id", ERROR_COLUMN))
    for name in metrics:
        columns[name] = pa.array(np.asarray(batch[name], np.float64))
    columns[ERROR_COLUMN] = pa.array([str(e) for e in batch.get(ERROR_COLUMN, [""] * len(ids))], pa.string())
    rows = [{k: float(batch[k][i]) for k in metrics} for i in range(len(ids))]
    for metric, column in zip(WINNER_METRICS, WINNER_COLUMNS):
        columns[column] = pa.array([best_method(r, keys, metric) for r in rows], pa.string())
    return pa.table(columns)


def commit_results(batch: Mapping[str, np.ndarray], results_dir: str, keys: Sequence[str]) -> pa.Table:
    """Commits one batch of per-image results as `results_dir/part-<hash of its ids>.parquet`
    (atomic; a retried batch replaces its part); returns its {"part", "rows"} row."""
    table = results_table(batch, keys)
    if table.num_rows == 0:
        return PART_SCHEMA.empty_table()
    fs, root = resolve_fs(results_dir)
    name = content_part_name(table.column("sample_id").to_pylist())
    write_parquet_atomic(fs, path_inside(fs, root, name), table)
    return pa.table({"part": [name], "rows": [table.num_rows]}, schema=PART_SCHEMA)


def iter_sorted_results(output: Output, parts: Sequence[str], batch_rows: int = SUMMARY_BATCH_ROWS
                        ) -> Iterator[pa.Table]:
    """The committed result rows in sample_id order, `batch_rows` at a time: sorted on the driver
    up to DRIVER_SORT_ROWS rows, beyond that by Ray Data (streamed, never held whole)."""
    total = sum(part_rows(output.fs, parts))
    if total <= DRIVER_SORT_ROWS:
        tables = []
        for path in parts:
            with output.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="default").sort_by("sample_id")
        for offset in range(0, table.num_rows, batch_rows):
            yield table.slice(offset, batch_rows)
        return
    import ray

    ds = ray.data.read_parquet(list(parts), filesystem=output.fs).sort("sample_id")
    yield from ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow")


class ResultTotals:
    """Streaming totals of result rows: per column the sum and count of non-NaN values, the images
    won per method, the number of scored rows, the first `keep` of them (for the report), and
    the pairs that could not be scored (counted; the first LISTED_MAX as {"sample_id", "error"})."""

    def __init__(self, keys: Sequence[str], keep: int = 0):
        self.keys, self.keep = list(keys), keep
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.wins = {m: {k: 0 for k in self.keys} for m in WINNER_METRICS}
        self.rows, self.first = 0, []
        self.errors, self.failed = 0, []

    def add(self, batch: pa.Table) -> None:
        if ERROR_COLUMN in batch.column_names:
            error = pc.fill_null(batch.column(ERROR_COLUMN), "")
            failed = batch.filter(pc.not_equal(error, ""))
            self.errors += failed.num_rows
            self.failed += failed.select(["sample_id", ERROR_COLUMN]).slice(0, LISTED_MAX - len(self.failed)).to_pylist()
            batch = batch.filter(pc.equal(error, ""))
        for name in batch.column_names:
            if name in ("sample_id", ERROR_COLUMN) or name in WINNER_COLUMNS:
                continue
            values = batch.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
            present = ~np.isnan(values)
            self.sums[name] = self.sums.get(name, 0.0) + float(values[present].sum())
            self.counts[name] = self.counts.get(name, 0) + int(present.sum())
        for metric, column in zip(WINNER_METRICS, WINNER_COLUMNS):
            if column in batch.column_names:
                for key in batch.column(column).to_pylist():
                    if key in self.wins[metric]:
                        self.wins[metric][key] += 1
        if len(self.first) < self.keep:
            self.first += batch.slice(0, self.keep - len(self.first)).to_pylist()
        self.rows += batch.num_rows

    def mean(self) -> Dict[str, Dict[str, float]]:
        """{method key: {metric: mean over the images with a value}} (NaN when none has one)."""
        return {key: {m: (self.sums[c] / self.counts[c] if self.counts[c] else float("nan"))
                      for m in PAPER_METRICS for c in [f"{key}/{m}"] if c in self.sums}
                for key in self.keys}


def write_per_image(output: Output, parts: Sequence[str], totals: ResultTotals) -> str:
    """per_image.csv from the committed parts in sample_id order (written atomically), adding
    every row to `totals` on the way; returns its path."""
    path = output.path("per_image.csv")

    def write(stream) -> None:
        columns = None
        for batch in iter_sorted_results(output, parts):
            totals.add(batch)
            text = io.StringIO()
            writer = csv.writer(text)
            if columns is None:
                columns = ["sample_id"] + sorted(set(batch.column_names) - {"sample_id"})
                writer.writerow(columns)
            data = [batch.column(c).to_pylist() if c in batch.column_names else [""] * batch.num_rows
                    for c in columns]
            writer.writerows(zip(*data))
            stream.write(text.getvalue().encode())

    atomic_write(output.fs, path, write)
    return path


# ---- the summary -----------------------------------------------------------------------------------
def summarize(cfg: EvalConfig, output: Output, suite: MetricSuite, methods: Sequence[Tuple[str, str, str]],
              run: Optional[Dict] = None, unmatched: Sequence[Dict[str, str]] = ()) -> Dict:
    """Tables, per-image CSV, report and summary.json from every committed result part of OUT
    (streamed in sample_id order: the same numbers whichever run committed which part).
    `unmatched`: the names found in only some of the input folders."""
    keys = [key for key, _, _ in methods]
    totals = ResultTotals(keys, keep=cfg.report_images)
    write_per_image(output, list_parts(output.fs, output.path(RESULTS_DIR)), totals)
    if not totals.rows and not totals.errors:
        raise ValueError(f"no pairs in {cfg.data}")
    mean = totals.mean()
    if "fid" in suite.available:
        images = os.path.join(cfg.out, "images")
        for key in keys:
            mean[key]["fid"] = suite.fid(os.path.join(images, safe_name(key)), os.path.join(images, "hr"))
    order = [m for m in PAPER_METRICS if m in suite.names]
    summary = {"dataset": cfg.dataset_name or os.path.basename(cfg.data.rstrip("/")), "n_images": totals.rows,
               "scale": cfg.scale, "methods": [list(m) for m in methods], "metrics_order": order, "mean": mean,
               "status": suite.status(), "unavailable": dict(suite.unavailable), "wins": totals.wins,
               "errors": totals.errors, "failed": totals.failed, "n_unmatched": len(unmatched),
               "unmatched": list(unmatched[:LISTED_MAX]), **(run or {})}
    headers, _, raw = table1(summary)
    write_csv(os.path.join(cfg.out, "table1.csv"), headers, raw)
    write_text(os.path.join(cfg.out, "table1.md"), table1_markdown(summary))
    summary["report"] = write_report(summary, cfg, totals.first)
    summary["files"] = {n: os.path.join(cfg.out, n) for n in SUMMARY_FILES}
    write_json_atomic(output.fs, output.path("summary.json"), summary)
    return summary
