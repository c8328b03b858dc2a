"""Evaluation job: the paper's Table-1 metrics for a checkpoint (or folders of SR outputs).

    python -m jobs.evaluate --data PAIRS [--lr-dir LR_DIR] --out OUT
        (--checkpoint CKPT [--steps 1 4] | --sr NAME=DIR ...) [--baseline NAME=WEIGHTS ...]
        [--metrics lpips dists fid niqe musiq maniqa clipiqa] [--allow-download]
        [--dataset-name NAME] [--limit N] [--num-actors N] [--num-gpus G] [--overwrite] [--address ...]

PAIRS is a folder (or URI) of Parquet pair shards in the `pipeline.schema` layout, or a folder
of HR images matched by file stem with the LR images in `--lr-dir`. Each pair is evaluated by
an actor pool of Ray Data (`PairEvaluator`: the model and the learned metrics are loaded once
per actor): bicubic, the model at every step count in `--steps` (`flowsr.sample.upscale`, no
colour fix unless `--color-fix`), every `--baseline` model (a weights file spandrel reads, such
as Real-ESRGAN, SwinIR, HAT or DAT, or another FlowSR checkpoint, run in the job through
`pipeline.sr_models`, its output resized to the HR size when its native scale differs) and
every `--sr` folder, each against HR with PSNR / SSIM on Y
(BasicSR, border = scale) and the learned metrics of `flowsr.metrics.MetricSuite` that have
weights here; a metric without weights is reported as unavailable with the reason. FID is
computed over the saved image folders on the driver. Local Ray by default, `--address` for a
cluster (then OUT, the data and the checkpoint must be reachable from every node).

OUT is written through `pipeline.output`: one run at a time holds its lease (a second concurrent
evaluate on OUT exits 2 with one line); its run record (`_run.json`: the inputs' file names and
sizes, the settings that change results, the checkpoint's and baselines' digests, the code
version) is checked on every rerun, and a rerun with others exits 2 naming what differs (pass
`--overwrite` to replace OUT's results, or use a new OUT). Per-image results are committed as
Parquet parts (OUT/results/part-<hash of their ids>.parquet) batch by batch, so a killed run
resumes: a rerun evaluates only the pairs without committed results, and the tables are computed
from all parts (streamed in sample_id order). Every file is written atomically.

OUT/ gets: table1.md, table1.csv (the paper's Table-1 layout), per_image.csv (with the method that
wins each image on PSNR and on SSIM), summary.json, config.json,
images/{hr,lr,bicubic,<method>}/<sample_id>.png and report.html with
LR / bicubic / each baseline / 1-step / 4-step / HR crops (PNG files in OUT/report/). File names
are `safe_name`s of the sample ids and method names (a name with other characters than letters,
digits, `.`, `_` and `-` gets them replaced and a hash of the original appended); the report
escapes all it prints.

A pair that cannot be scored (an LR that is not HR / scale, an HR too small for the metrics'
border, an undecodable image, an SR output of another size) is an error row (per_image.csv
`error`, no metrics) and every other pair is still scored; the tables, the report and
summary.json (`errors`, `failed`) say how many failed and why. With HR / LR folders, names found
in only some of the folders are listed in the report and in summary.json (`unmatched`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import html
import io
import json
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flowsr.metrics import LEARNED_METRICS, LOWER_BETTER, PAPER_METRICS, SET_METRICS, MetricSuite, mean_metrics
from jobs.common import (add_allow_errors_arg, add_ray_args, exit_status, fit_actor_cpus, init_ray, is_local,
                         resolve_fs)
from pipeline.done_index import EMPTY_INDEX, INDEX_DIR, DoneIndex, build_done_index
from pipeline.fingerprint import checkpoint_digest
from pipeline.output import (Output, OutputError, atomic_write, content_part_name, list_parts, open_output, part_rows,
                             path_inside, run_record, write_bytes_atomic, write_json_atomic, write_parquet_atomic)
from pipeline.schema import decode_png, encode_png

REPORT_DISPLAY = 256  # crops are shown enlarged by an integer factor to about this many pixels
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PAIR_COLUMNS = ["sample_id", "hr", "lr"]
BICUBIC = "bicubic"
# Table-1 column headers and number formats, as printed in the paper
HEADERS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "dists": "DISTS", "fid": "FID", "niqe": "NIQE",
           "musiq": "MUSIQ", "maniqa": "MANIQA", "clipiqa": "CLIPQA"}
WINNER_METRICS = ("psnr", "ssim")  # per image, the method with the highest value is named
WINNER_COLUMNS = tuple(f"best_{m}" for m in WINNER_METRICS)
BASELINE_NAME = re.compile(r"[A-Za-z0-9._+-]+")
DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "dists": 4, "fid": 2, "niqe": 2, "musiq": 2, "maniqa": 4, "clipiqa": 4}


SAFE_NAME_MAX = 120  # characters kept of a name before its hash
RESULTS_DIR = "results"  # per-image metric parts under OUT, one committed per evaluated batch
DRIVER_SORT_ROWS = 100_000  # up to this many result rows are sorted on the driver, more by Ray Data
OVERWRITE_ADVICE = "rerun with --overwrite to replace them, or evaluate into a new --out"
SUMMARY_BATCH_ROWS = 4096  # result rows per step of the summary pass (fixed: the sums do not depend on the parts)
ERROR_COLUMN = "error"  # of a result row: why its pair could not be scored ("" when it was)
LISTED_MAX = 1000  # failed pairs and unmatched names named in summary.json and the report (all are counted)


def safe_name(text: str) -> str:
    """`text` as one file-name component: unchanged when it is only letters, digits, `.`, `_`,
    `-` (and does not start with `.`), else those characters kept, the rest replaced by `_`,
    plus the first 10 hex digits of its sha1 (distinct names stay distinct)."""
    kept = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:SAFE_NAME_MAX].lstrip(".")
    if kept == text and kept:
        return text
    return f"{kept}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def image_path(out: str, key: str, sample_id: str) -> str:
    """OUT/images/<key>/<sample_id>.png, both parts as `safe_name`s."""
    return os.path.join(out, "images", safe_name(key), f"{safe_name(sample_id)}.png")


def step_key(steps: int) -> str:
    return f"{steps}-step"


@dataclass(frozen=True)
class EvalConfig:
    data: str  # Parquet shards (pipeline/schema.py) or a folder of HR images
    out: str
    lr_dir: Optional[str] = None  # LR folder when `data` is an HR folder
    checkpoint: Optional[str] = None
    sr: Tuple[Tuple[str, str], ...] = ()  # (method name, folder of SR outputs named like the HR files)
    baselines: Tuple[Tuple[str, str], ...] = ()  # (method name, model run in the job: pipeline.sr_models)
    steps: Tuple[int, ...] = (1, 4)
    scale: int = 4
    metrics: Tuple[str, ...] = LEARNED_METRICS
    allow_download: bool = False
    dataset_name: str = ""  # Table-1 "Datasets" column; default: the data folder's name
    method_name: str = "FlowSR"
    weights: str = "student"  # student | target (EMA)
    pretrained: Optional[str] = None  # override the SD base model location in the checkpoint
    color_fix: str = "none"  # none | wavelet | adain (what jobs.upscale applies by default: wavelet)
    tile: Optional[int] = None  # output pixels; None: whole images
    seed: int = 0  # noise of the Table-2 flow variants, per image from (seed, sample_id, steps)
    limit: Optional[int] = None
    batch_size: int = 4
    num_actors: int = 1
    num_gpus: float = 0.0  # per actor
    report_images: int = 4
    crop_size: int = 128  # HR pixels of each report crop
    address: Optional[str] = None
    overwrite: bool = False  # replace the results OUT holds (another run's) instead of resuming them

    def __post_init__(self):
        if not is_local(self.out):
            raise ValueError(f"out must be a local folder (tables and report are written there), got {self.out}")
        if self.checkpoint is not None and self.sr:
            raise ValueError("give exactly one of checkpoint or SR folders (plus any baseline models)")
        if self.checkpoint is None and not self.sr and not self.baselines:
            raise ValueError("give exactly one of checkpoint or SR folders, or baseline models")
        if self.scale < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError(f"need scale >= 1 and step counts >= 1, got {self.scale}, {self.steps}")
        unknown = set(self.metrics) - set(PAPER_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics: {sorted(unknown)} (choose from {', '.join(PAPER_METRICS)})")
        if min(self.batch_size, self.num_actors) < 1:
            raise ValueError("batch_size and num_actors must be >= 1")
        names = [n for n, _ in self.sr + self.baselines]
        reserved = {BICUBIC, "hr", "lr", *WINNER_COLUMNS, *(step_key(s) for s in self.steps)}
        if len(set(names)) != len(names) or set(names) & reserved:
            raise ValueError(f"SR folder and baseline names must be unique and not {', '.join(sorted(reserved))}, "
                             f"got {names}")
        bad = [n for n, _ in self.baselines if not BASELINE_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"baseline names are folder names: letters, digits, '.', '_', '+' or '-', got {bad}")

    def methods(self) -> List[Tuple[str, str, str]]:
        """(key, Table-1 method, #steps) per evaluated row, bicubic first."""
        rows = [(BICUBIC, "Bicubic", "-")]
        rows += [(name, name, "-") for name, _ in self.baselines]
        if self.checkpoint is not None:
            rows += [(step_key(s), self.method_name, str(s)) for s in self.steps]
        rows += [(name, name, "-") for name, _ in self.sr]
        return rows


# ---- images --------------------------------------------------------------------------------------
def _tensor(image: np.ndarray, device=None):
    from flowsr.data import to_tensor

    return to_tensor(image)[None].to(device)


def _uint8(x) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 HxWx3, rounded as BasicSR's tensor2img."""
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def bicubic(lr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """LR uint8 HxWx3 -> bicubic (torch, as the model's input) at `size` = (H, W), uint8."""
    from flowsr.sample import resize_to

    return _uint8(resize_to(_tensor(lr), size))


def image_generator(seed: int, sample_id: str, steps: int):
    """CPU torch.Generator of one image's sampling noise: sha1(seed|sample_id|steps)."""
    import torch

    digest = hashlib.sha1(f"{seed}|{sample_id}|{steps}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def super_resolve_image(backbone, lr: np.ndarray, size: Tuple[int, int], steps: int, *, seed: int = 0,
                        sample_id: str = "", color_fix: str = "none", tile: Optional[int] = None) -> np.ndarray:
    """LR uint8 HxWx3 -> SR uint8 at `size` with `steps` Euler steps (`flowsr.sample.upscale`)."""
    import torch

    from flowsr.sample import upscale

    device = next(iter(backbone.parameters())).device
    with torch.no_grad():
        sr = upscale(backbone, _tensor(lr, device), steps=steps, out_size=tuple(size), tile=tile, vae_tile=tile,
                     color_fix=color_fix, generator=image_generator(seed, sample_id, steps))
    return _uint8(sr)


def _check_sizes(lr: np.ndarray, hr: np.ndarray, scale: int, sample_id: str) -> None:
    if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(f"{sample_id}: HR {hr.shape[:2]} is not {scale}x LR {lr.shape[:2]}")


def method_outputs(backbone, lr: np.ndarray, hr: np.ndarray, steps: Sequence[int], *, scale: int = 4,
                   seed: int = 0, sample_id: str = "", color_fix: str = "none",
                   tile: Optional[int] = None) -> Dict[str, np.ndarray]:
    """{"bicubic": ..., "1-step": ..., ...}: every method's uint8 output at the HR size."""
    _check_sizes(lr, hr, scale, sample_id)
    out = {BICUBIC: bicubic(lr, hr.shape[:2])}
    if backbone is not None:
        for s in steps:
            out[step_key(s)] = super_resolve_image(backbone, lr, hr.shape[:2], s, seed=seed, sample_id=sample_id,
                                                   color_fix=color_fix, tile=tile)
    return out


# ---- the reusable core: a backbone + (lr, hr) pairs -----------------------------------------------
def evaluate_pairs(backbone, pairs: Sequence[Tuple[np.ndarray, np.ndarray]], steps: Sequence[int] = (1, 4), *,
                   scale: int = 4, suite: Optional[MetricSuite] = None, seed: int = 0,
                   ids: Optional[Sequence[str]] = None, color_fix: str = "none", tile: Optional[int] = None,
                   return_images: bool = False) -> Dict:
    """Bicubic and `steps`-step SR of each (lr, hr) pair, scored against HR.

    pairs: uint8 HxWx3 RGB arrays, HR exactly `scale` x LR. `suite` defaults to PSNR / SSIM only
    (border = scale). Returns {"per_image": [{"id", "bicubic": {metric: value}, "1-step": {...},
    ...}], "mean": {method: {metric: mean}}, "methods": [...]}; with `return_images` each
    per-image entry also has "images": {method: uint8 array}.
    """
    suite = suite or MetricSuite((), crop_border=scale)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(pairs))]
    per_image = []
    for sid, (lr, hr) in zip(ids, pairs):
        outputs = method_outputs(backbone, lr, hr, steps, scale=scale, seed=seed, sample_id=sid,
                                 color_fix=color_fix, tile=tile)
        entry = {"id": sid}
        for key, sr in outputs.items():
            entry[key] = {m: v[0] for m, v in suite.score([sr], [hr]).items()}
        if return_images:
            entry["images"] = outputs
        per_image.append(entry)
    methods = [BICUBIC] + ([step_key(s) for s in steps] if backbone is not None else [])
    mean = {k: mean_metrics([e[k] for e in per_image]) for k in methods}
    return {"per_image": per_image, "mean": mean, "methods": methods}


# ---- the Ray Data stage ----------------------------------------------------------------------------
class PairEvaluator:
    """Stateful batch callable: loads the checkpoint and the learned metrics once, maps a batch
    of pairs to a batch of per-image metrics (columns "sample_id" and "<method>/<metric>").

    Batch in: "sample_id" and either "hr" / "lr" (encoded bytes) or "hr_uri" / "lr_uri", plus
    "sr_uri/<name>" per SR folder. Runs without Ray in a plain loop as well.
    """

    def __init__(self, cfg: Mapping, metrics: Sequence[str] = ()):
        import torch

        self.cfg = EvalConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.backbone = None
        if self.cfg.checkpoint is not None:
            from flowsr.checkpoint import load_for_inference

            from pipeline.storage import cached_copy

            pretrained = cached_copy(self.cfg.pretrained) if self.cfg.pretrained else None
            self.backbone, _ = load_for_inference(cached_copy(self.cfg.checkpoint), device=self.device,
                                                  weights=self.cfg.weights, pretrained=pretrained)
        self.baselines = {}
        if self.cfg.baselines:
            from pipeline.sr_models import load_upscaler
            from pipeline.storage import cached_copy

            tile = self.cfg.tile // self.cfg.scale if self.cfg.tile else None  # input pixels
            self.baselines = {name: load_upscaler(cached_copy(model), scale=self.cfg.scale, tile=tile, device=self.device,
                                                  dtype="fp32", color_fix=self.cfg.color_fix)
                              for name, model in self.cfg.baselines}
        self.suite = MetricSuite(metrics, device=str(self.device), allow_download=self.cfg.allow_download,
                                 crop_border=self.cfg.scale)
        self.fs, self.out_root = resolve_fs(self.cfg.out)

    def _read(self, uri: str) -> bytes:
        fs, path = resolve_fs(uri)
        with fs.open_input_file(path) as f:
            return f.read()

    def _save(self, key: str, sample_id: str, image: np.ndarray) -> None:
        path = path_inside(self.fs, self.out_root, "images", safe_name(key), f"{safe_name(sample_id)}.png")
        write_bytes_atomic(self.fs, path, encode_png(image))

    def evaluate_one(self, sample_id: str, hr: np.ndarray, lr: np.ndarray, sr: Mapping[str, np.ndarray]) -> Dict:
        c = self.cfg
        outputs = method_outputs(self.backbone, lr, hr, c.steps, scale=c.scale, seed=c.seed, sample_id=sample_id,
                                 color_fix=c.color_fix, tile=c.tile)
        for name, upscaler in self.baselines.items():
            (outputs[name],), _ = upscaler.upscale_images([lr])
        for name, image in sr.items():
            if image.shape != hr.shape:
                raise ValueError(f"{sample_id}: SR '{name}' {image.shape} does not match HR {hr.shape}")
            outputs[name] = image
        row = {"sample_id": sample_id}
        for key, image in outputs.items():
            for metric, values in self.suite.score([image], [hr]).items():
                row[f"{key}/{metric}"] = values[0]
        for key, image in {"hr": hr, "lr": lr, **outputs}.items():
            self._save(key, sample_id, image)
        return row

    def pair_row(self, batch: Dict, i: int) -> Dict:
        """The result row of pair `i` of `batch`: its metrics, or, when it cannot be scored, its
        ERROR_COLUMN saying why (and no metrics)."""
        sid = str(batch["sample_id"][i])
        try:
            hr_bytes = batch["hr"][i] if "hr" in batch else self._read(str(batch["hr_uri"][i]))
            lr_bytes = batch["lr"][i] if "lr" in batch else self._read(str(batch["lr_uri"][i]))
            sr = {k.split("/", 1)[1]: decode_png(self._read(str(batch[k][i])))
                  for k in batch if k.startswith("sr_uri/")}
            return {**self.evaluate_one(sid, decode_png(hr_bytes), decode_png(lr_bytes), sr), ERROR_COLUMN: ""}
        except Exception as err:  # noqa: BLE001 — one bad pair must not cost the others their scores
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return {"sample_id": sid, ERROR_COLUMN: f"{type(err).__name__}: {reason}"}

    def __call__(self, batch: Dict) -> Dict:
        rows = [self.pair_row(batch, i) for i in range(len(batch["sample_id"]))]
        if not rows:  # every pair of the batch had committed results already
            return {"sample_id": np.asarray([], dtype=str)}
        keys = sorted({k for r in rows for k in r})
        return {k: np.asarray([r.get(k, "" if k in ("sample_id", ERROR_COLUMN) else np.nan) for r in rows])
                for k in keys}


# ---- the output: run record, committed result parts, resume ----------------------------------------
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


def drop_done(batch: pa.Table, done: DoneIndex) -> pa.Table:
    """The pairs of `batch` whose results are not committed yet."""
    finished = done.done([str(s) for s in batch.column("sample_id").to_pylist()])
    return batch.filter(pa.array(~finished)) if finished.any() else batch


PART_SCHEMA = pa.schema([("part", pa.string()), ("rows", pa.int64())])


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


# ---- inputs ---------------------------------------------------------------------------------------
def _list_images(uri: str) -> Dict[str, str]:
    """{file stem: uri} of the images directly in folder `uri`."""
    import pyarrow.fs as pafs

    fs, root = resolve_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    prefix = uri.rstrip("/") if not is_local(uri) else None
    out = {}
    for info in infos:
        name = os.path.basename(info.path)
        stem, ext = os.path.splitext(name)
        if info.type == pafs.FileType.File and ext.lower() in IMAGE_SUFFIXES:
            out[stem] = f"{prefix}/{name}" if prefix else info.path
    return out


def _is_parquet(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, root = resolve_fs(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return root.endswith(".parquet")
    return any(f.path.endswith(".parquet") for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)))


def _folders(cfg: EvalConfig) -> Dict[str, Dict[str, str]]:
    """{folder label ("HR", "LR", "SR <name>"): {file stem: uri}} of an HR / LR folder evaluation."""
    if cfg.lr_dir is None:
        raise ValueError(f"{cfg.data} holds no Parquet shards: give --lr-dir for an HR image folder")
    return {"HR": _list_images(cfg.data), "LR": _list_images(cfg.lr_dir),
            **{f"SR {name}": _list_images(path) for name, path in cfg.sr}}


def folder_items(cfg: EvalConfig) -> List[Dict[str, str]]:
    """One item per HR image that has an LR image (and every SR output) of the same stem."""
    return _folder_pairs(cfg)[0]


def _folder_pairs(cfg: EvalConfig) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """(`folder_items`, the unmatched names: {"name", "missing": the folders without it}, sorted)."""
    folders = _folders(cfg)
    stems = sorted(set().union(*folders.values()))
    shared = [s for s in stems if all(s in v for v in folders.values())]
    unmatched = [{"name": s, "missing": ", ".join(k for k, v in folders.items() if s not in v)}
                 for s in stems if not all(s in v for v in folders.values())]
    if not shared:
        raise ValueError(f"no image stems shared by {cfg.data}, {cfg.lr_dir} and the SR folders")
    hr, lr = folders["HR"], folders["LR"]
    items = [{"sample_id": s, "hr_uri": hr[s], "lr_uri": lr[s],
              **{f"sr_uri/{n}": folders[f"SR {n}"][s] for n, _ in cfg.sr}} for s in shared]
    return items, unmatched


def pair_items(cfg: EvalConfig) -> Tuple[Optional[List[Dict[str, str]]], List[Dict[str, str]]]:
    """Checks the inputs without Ray: (None, []) for Parquet pair shards, else the folder items
    and the names found in only some of the folders (`_folder_pairs`); ValueError when the
    inputs hold no pairs."""
    if _is_parquet(cfg.data):
        if cfg.sr:
            raise ValueError("SR folders are evaluated against HR/LR folders, not Parquet shards")
        return None, []
    return _folder_pairs(cfg)


def build_dataset(cfg: EvalConfig, items: Optional[List[Dict[str, str]]] = None):
    """The pairs as a Ray Dataset: the Parquet shards when `items` is None, else the folder items."""
    import ray

    ds = ray.data.read_parquet(cfg.data, columns=PAIR_COLUMNS) if items is None else ray.data.from_items(items)
    return ds.limit(cfg.limit) if cfg.limit else ds


# ---- reports --------------------------------------------------------------------------------------
def format_metric(metric: str, value: Optional[float]) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{DECIMALS.get(metric, 4)}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV file at `path` (a local path or URI), written atomically."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(headers)
    w.writerows(rows)
    fs, target = resolve_fs(path)
    write_bytes_atomic(fs, target, text.getvalue().encode())


def _write_text(path: str, text: str) -> None:
    fs, target = resolve_fs(path)
    write_bytes_atomic(fs, target, text.encode())


def table1(summary: Dict) -> Tuple[List[str], List[List[str]], List[List]]:
    """(headers, formatted rows, raw rows) of the paper's Table-1 layout."""
    metrics = summary["metrics_order"]
    headers = ["Datasets", "Methods", "#Steps"] + [HEADERS[m] for m in metrics]
    shown, raw = [], []
    for i, (key, method, steps) in enumerate(summary["methods"]):
        values = summary["mean"].get(key, {})
        label = summary["dataset"] if i == 0 else ""
        shown.append([label, method, steps] + [format_metric(m, values.get(m)) for m in metrics])
        raw.append([summary["dataset"], method, steps] + [values.get(m, "") for m in metrics])
    return headers, shown, raw


def best_method(row: Mapping, keys: Sequence[str], metric: str) -> str:
    """The method key with the highest `metric` in a per-image row (the first of equals; "" if none)."""
    scores = [(row.get(f"{k}/{metric}", np.nan), k) for k in keys]
    scores = [(v, k) for v, k in scores if np.isfinite(v)]
    return max(scores, key=lambda s: s[0])[1] if scores else ""


def wins_table(summary: Dict) -> Tuple[List[str], List[List[str]]]:
    """(headers, rows): per method, the images on which it has the highest PSNR and SSIM."""
    wins = summary.get("wins", {})
    headers = ["Methods", "#Steps"] + [f"{HEADERS[m]} wins" for m in WINNER_METRICS]
    rows = [[method, steps] + [str(wins.get(m, {}).get(key, 0)) for m in WINNER_METRICS]
            for key, method, steps in summary["methods"]]
    return headers, rows


def table1_markdown(summary: Dict) -> str:
    headers, shown, _ = table1(summary)
    arrows = {m: "↓" if m in LOWER_BETTER else "↑" for m in summary["metrics_order"]}
    headers = headers[:3] + [f"{h} {arrows[m]}" for h, m in zip(headers[3:], summary["metrics_order"])]
    notes = [f"- {HEADERS[m]}: {reason}" for m, reason in summary["unavailable"].items()]
    text = markdown_table(headers, shown)
    text += f"\n\nPSNR / SSIM on the Y channel (BasicSR), border {summary['scale']} px; {summary['n_images']} images."
    if notes:
        text += "\n\nn/a = unavailable here (never estimated):\n" + "\n".join(notes)
    if summary.get("wins"):
        text += f"\n\nPer-image wins (highest value of {summary['n_images']} images):\n\n"
        text += markdown_table(*wins_table(summary))
    return text + "".join(f"\n\n{line}" for line in problem_lines(summary)) + "\n"


def problem_lines(summary: Dict) -> List[str]:
    """What the tables leave out, in words: pairs that could not be scored, names without a pair."""
    lines = []
    if summary.get("errors"):
        lines.append(f"{summary['errors']} pairs could not be scored (per_image.csv, column `{ERROR_COLUMN}`): "
                     + "; ".join(f"{r['sample_id']}: {r[ERROR_COLUMN]}" for r in summary["failed"]))
    if summary.get("n_unmatched"):
        lines.append(f"{summary['n_unmatched']} names are not in every input folder, so not evaluated: "
                     + "; ".join(f"{r['name']} (no {r['missing']})" for r in summary["unmatched"]))
    return lines


def _crop_box(shape, size: int, scale: int) -> Tuple[int, int, int]:
    """(top, left, size) of a centred crop on the LR grid, in HR pixels."""
    size = min(size, shape[0], shape[1]) // scale * scale
    top = (shape[0] - size) // 2 // scale * scale
    left = (shape[1] - size) // 2 // scale * scale
    return top, left, size


def _read_png(out: str, key: str, sample_id: str) -> np.ndarray:
    with open(image_path(out, key, sample_id), "rb") as f:
        return decode_png(f.read())


def write_report(summary: Dict, cfg: EvalConfig, per_image: List[Dict]) -> str:
    """report.html next to the tables, with crops of the first `report_images` samples as PNG
    files in OUT/report/ (LR shown nearest-neighbour enlarged)."""
    from PIL import Image

    out = cfg.out
    fs, root = resolve_fs(out)
    columns = [("lr", "LR (before)")] + [(k, f"{m}" + (f" ({s} step{'s' if s != '1' else ''})" if s != "-" else ""))
                                         for k, m, s in summary["methods"]] + [("hr", "HR")]
    blocks = []
    for row in per_image[:cfg.report_images]:
        sid = row["sample_id"]
        hr = _read_png(out, "hr", sid)
        top, left, size = _crop_box(hr.shape, cfg.crop_size, cfg.scale)
        cells = []
        for key, title in columns:
            image = _read_png(out, key, sid)
            if key == "lr":
                s = cfg.scale
                crop = image[top // s:(top + size) // s, left // s:(left + size) // s]
                crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.NEAREST))
            else:
                crop = image[top:top + size, left:left + size]
            file_name = f"{safe_name(f'{sid}_{key}')}.png"
            name = f"report/{file_name}"
            write_bytes_atomic(fs, path_inside(fs, root, "report", file_name), encode_png(np.ascontiguousarray(crop)))
            score = row.get(f"{key}/psnr")
            caption = html.escape(title) + (f"<br>{score:.2f} dB" if score is not None and np.isfinite(score) else "")
            shown = size * max(1, REPORT_DISPLAY // size)
            src = html.escape(urllib.parse.quote(name), quote=True)
            cells.append(f'<figure><img src="{src}" width="{shown}" height="{shown}"><figcaption>{caption}'
                         f"</figcaption></figure>")
        best = {m: dict((k, t) for k, t in columns).get(row.get(f"best_{m}", ""), "") for m in WINNER_METRICS}
        heading = html.escape(sid) + "".join(f" &middot; best {HEADERS[m]}: {html.escape(best[m])}"
                                             for m in WINNER_METRICS if best[m])
        blocks.append(f"<h3>{heading}</h3><div class='row'>{''.join(cells)}</div>")
    headers, shown, _ = table1(summary)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in shown)
    table += "</table>"
    wins_headers, wins_rows = wins_table(summary)
    table += "<h2>Per-image wins</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in wins_headers)
    table += "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                               for r in wins_rows) + "</table>"
    notes = "".join(f"<li>{html.escape(HEADERS.get(m, m))}: {html.escape(str(r))}</li>"
                    for m, r in summary["unavailable"].items())
    problems = ""
    if summary.get("errors"):
        problems += (f"<h2>Pairs not scored ({int(summary['errors'])})</h2><ul>"
                     + "".join(f"<li>{html.escape(r['sample_id'])}: {html.escape(r[ERROR_COLUMN])}</li>"
                               for r in summary["failed"]) + "</ul>")
    if summary.get("n_unmatched"):
        problems += (f"<h2>Names not in every folder ({int(summary['n_unmatched'])})</h2><ul>"
                     + "".join(f"<li>{html.escape(r['name'])}: no {html.escape(r['missing'])}</li>"
                               for r in summary["unmatched"]) + "</ul>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>FlowSR evaluation: {html.escape(summary['dataset'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}} .row{{display:flex;gap:8px;flex-wrap:wrap}}
figure{{margin:0;text-align:center}} img{{image-rendering:pixelated}}</style></head><body>
<h1>FlowSR evaluation: {html.escape(summary['dataset'])}</h1>
<p>{int(summary['n_images'])} images, x{html.escape(str(summary['scale']))}; PSNR / SSIM on Y (BasicSR), border {html.escape(str(summary['scale']))} px.
Crops of {cfg.crop_size}px (HR) from the image centre; the caption gives the image's PSNR.</p>
{table}
{f"<p>Unavailable metrics (never estimated):</p><ul>{notes}</ul>" if notes else ""}
{problems}
<h2>Crops</h2>
{''.join(blocks)}
</body></html>
"""
    path = os.path.join(out, "report.html")
    _write_text(path, page)
    return path


# ---- the job --------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, on_part: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run the evaluation on Ray; writes the tables, per-image CSV, summary and report into
    `cfg.out` (a local folder) and returns the summary dict.

    OUT is written through `pipeline.output`: its lease (a concurrent run on OUT refuses), its
    run record (a rerun with other inputs, settings or checkpoint refuses unless `overwrite`),
    per-image results committed as Parquet parts under OUT/results as each batch finishes. A
    rerun evaluates only the pairs without committed results; the tables are computed from all
    parts. `on_part({"part", "rows"})` sees each part as it is committed (progress, tests).
    Raises OutputBusy / RunMismatch (one-line `pipeline.output.OutputError`s) and ValueError for
    inputs that hold no pairs.
    """
    import ray

    suite = MetricSuite(cfg.metrics, allow_download=cfg.allow_download, crop_border=cfg.scale)
    per_image_metrics = [m for m in suite.available if m not in SET_METRICS]
    record = eval_record(cfg, per_image_metrics)
    methods = cfg.methods()
    keys = [key for key, _, _ in methods]
    items, unmatched = pair_items(cfg)  # the inputs are checked before OUT is touched, OUT before Ray is started
    with open_output(cfg.out, record, overwrite=cfg.overwrite, advice=OVERWRITE_ADVICE) as output:
        started = init_ray(cfg.address)
        try:
            pairs = build_dataset(cfg, items)
            write_json_atomic(output.fs, output.path("config.json"), dataclasses.asdict(cfg))
            results = output.path(RESULTS_DIR)
            done = build_done_index(output, list_parts(output.fs, results), "sample_id", RESULTS_DIR)
            if done is not EMPTY_INDEX:
                pairs = pairs.map_batches(drop_done, fn_kwargs={"done": done}, batch_format="pyarrow")
            # one block per evaluator batch: each batch's results are committed as soon as it is done
            pairs = pairs.repartition(target_num_rows_per_block=cfg.batch_size)
            ds = pairs.map_batches(
                PairEvaluator, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "metrics": per_image_metrics},
                batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_gpus=cfg.num_gpus or None, batch_format="numpy",
                num_cpus=fit_actor_cpus(1.0, cfg.num_actors, ray.cluster_resources().get("CPU", 0), "evaluate"))
            # the part writer only turns a batch of numbers into Parquet: no CPU of its own
            ds = ds.map_batches(commit_results, fn_kwargs={"results_dir": output.uri_of(RESULTS_DIR), "keys": keys},
                                batch_size=cfg.batch_size, batch_format="numpy", num_cpus=0)
            evaluated = 0
            for row in ds.iter_rows():
                evaluated += int(row["rows"])
                if on_part is not None:
                    on_part(row)
            summary = summarize(cfg, output, suite, methods, {"evaluated": evaluated, "resumed": output.resumed},
                                unmatched)
            if output.fs.get_file_info(output.path(INDEX_DIR)).type == pafs.FileType.Directory:
                output.fs.delete_dir(output.path(INDEX_DIR))  # this run's resume state
        finally:
            if started:
                ray.shutdown()
    return summary


def summarize(cfg: EvalConfig, output: Output, suite: MetricSuite, methods: Sequence[Tuple[str, str, str]],
              run: Optional[Dict] = None, unmatched: Sequence[Dict[str, str]] = ()) -> Dict:
    """Tables, per-image CSV, report and summary.json from every committed result part of OUT
    (streamed in sample_id order: the same numbers whichever run committed which part).
    `unmatched`: the names found in only some of the input folders (`pair_items`)."""
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
    _write_text(os.path.join(cfg.out, "table1.md"), table1_markdown(summary))
    summary["report"] = write_report(summary, cfg, totals.first)
    summary["files"] = {n: os.path.join(cfg.out, n) for n in ("table1.md", "table1.csv", "per_image.csv",
                                                              "summary.json", "report.html")}
    write_json_atomic(output.fs, output.path("summary.json"), summary)
    return summary


def _named_folder(item: str) -> Tuple[str, str]:
    if "=" in item:
        name, path = item.split("=", 1)
        return name, path
    return os.path.basename(item.rstrip("/")), item


def _check_baselines(cfg: EvalConfig) -> None:
    """Every baseline names a model these jobs can run (a one-line `ModelError` otherwise)."""
    from pipeline.sr_models import describe

    for _, model in cfg.baselines:
        describe(model)


def _named_model(item: str) -> Tuple[str, str]:
    """NAME=MODEL, or MODEL alone (named after its file stem)."""
    if "=" in item:
        name, path = item.split("=", 1)
        return name, path
    return os.path.splitext(os.path.basename(item.rstrip("/")))[0], item


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="Parquet pair shards, or a folder of HR images")
    p.add_argument("--lr-dir", default=None, help="LR images named like the HR files (with an HR folder)")
    p.add_argument("--out", required=True, help="local output folder")
    p.add_argument("--checkpoint", default=None, help="a flowsr checkpoint directory (path or URI: s3://, gs://, file://)")
    p.add_argument("--sr", action="append", default=[], metavar="NAME=DIR", help="a folder of SR outputs (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=WEIGHTS",
                   help="a model run in the job beside FlowSR (repeatable): an SR weights file that spandrel reads "
                        "(.pth/.safetensors: Real-ESRGAN, SwinIR, HAT, DAT, ...) or a FlowSR checkpoint")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4],
                   help="FlowSR sampling steps to score (one column each)")
    p.add_argument("--scale", type=int, default=4,
                   help="SR factor of the pairs")
    p.add_argument("--metrics", nargs="*", default=list(LEARNED_METRICS), help="learned metrics (PSNR/SSIM always)")
    p.add_argument("--allow-download", action="store_true", help="let the metric library download weights")
    p.add_argument("--dataset-name", default="",
                   help="dataset name shown in the tables and report")
    p.add_argument("--method-name", default="FlowSR",
                   help="name of the checkpoint's rows in the tables")
    p.add_argument("--weights", default="student", choices=["student", "target"],
                   help="checkpoint weights: student, or target (the EMA)")
    p.add_argument("--pretrained", default=None, help="override the SD base model location recorded in the checkpoint")
    p.add_argument("--color-fix", default="none", choices=["none", "wavelet", "adain"],
                   help="colour correction of the SR output against the LR")
    p.add_argument("--tile", type=int, default=0, help="tile size in output pixels (0: whole images)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-image sampling noise")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N pairs")
    p.add_argument("--batch-size", type=int, default=4,
                   help="pairs per evaluator call")
    p.add_argument("--num-actors", type=int, default=1,
                   help="evaluator actors (each loads the models once)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    p.add_argument("--report-images", type=int, default=4,
                   help="images shown as side-by-side crops in the HTML report")
    p.add_argument("--crop-size", type=int, default=128,
                   help="size of those crops, HR pixels")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results OUT holds instead of resuming them (needed when the inputs, settings "
                        "or checkpoint differ from the run that wrote them)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, run nothing")
    add_allow_errors_arg(p)
    add_ray_args(p)
    return p


def config_from_args(args) -> EvalConfig:
    return EvalConfig(data=args.data, out=args.out, lr_dir=args.lr_dir, checkpoint=args.checkpoint,
                      sr=tuple(_named_folder(s) for s in args.sr),
                      baselines=tuple(_named_model(b) for b in args.baseline), steps=tuple(args.steps),
                      scale=args.scale,
                      metrics=tuple(args.metrics), allow_download=args.allow_download,
                      dataset_name=args.dataset_name, method_name=args.method_name, weights=args.weights,
                      pretrained=args.pretrained,
                      color_fix=args.color_fix, tile=args.tile or None, seed=args.seed, limit=args.limit,
                      batch_size=args.batch_size, num_actors=args.num_actors, num_gpus=args.num_gpus,
                      report_images=args.report_images, crop_size=args.crop_size, address=args.address,
                      overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        _check_baselines(cfg)
    except ValueError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    try:
        summary = evaluate(cfg)
    except (OutputError, FileNotFoundError, ValueError) as err:
        from ray.exceptions import RayError

        if isinstance(err, RayError):  # a failure inside a task: its traceback is the information
            raise
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(table1_markdown(summary))
    print(json.dumps(summary["files"], indent=2))
    return exit_status(summary.get("errors", 0), args.allow_errors)  # pairs that could not be scored


if __name__ == "__main__":
    sys.exit(main())
