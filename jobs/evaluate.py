"""Evaluation job: the paper's Table-1 metrics for a checkpoint (or folders of SR outputs).

    python -m jobs.evaluate --data PAIRS [--lr-dir LR_DIR] --out OUT
        (--checkpoint CKPT [--steps 1 4] | --sr NAME=DIR ...) [--baseline NAME=WEIGHTS ...]
        [--metrics lpips dists fid niqe musiq maniqa clipiqa] [--allow-download]
        [--dataset-name NAME] [--limit N] [--num-actors N] [--num-gpus G] [--overwrite] [--address ...]

PAIRS is a folder (or URI) of Parquet pair shards (`pipeline.schema`), or a folder of HR images
matched by file stem with the LR images in `--lr-dir`. An actor pool of Ray Data
(`pipeline.evaluation.PairEvaluator`) scores bicubic, the model at every step count in `--steps`,
every `--baseline` model (`pipeline.sr_models`) and every `--sr` folder against HR: PSNR / SSIM
on Y (BasicSR, border = scale) and the learned metrics of `flowsr.metrics.MetricSuite` that have
weights here (the others are reported unavailable, with the reason); FID over the saved image
folders on the driver. Local Ray by default, `--address` for a cluster (then OUT, the data and
the checkpoint must be reachable from every node).

OUT (`pipeline.eval_results`) holds a lease (a second concurrent run exits 2) and a run record (a
rerun with other inputs, settings or models exits 2 unless `--overwrite`); per-image results are
committed batch by batch, so a killed run resumes. OUT/ gets table1.md, table1.csv,
per_image.csv, summary.json, config.json, images/{hr,lr,bicubic,<method>}/<sample_id>.png and
report.html with its crops in OUT/report/ (`pipeline.report`). A pair that cannot be scored is an
error row, counted and named in the tables, the report and summary.json, as are the names found
in only some of the HR / LR / SR folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow.fs as pafs

from flowsr.metrics import LEARNED_METRICS, SET_METRICS, MetricSuite
from jobs.common import add_allow_errors_arg, add_ray_args, exit_status, fit_actor_cpus, job_main, using_ray
from pipeline.storage import is_local, resolve_fs
from pipeline.eval_results import RESULTS_DIR, commit_results, drop_done, eval_record, summarize
from pipeline.evaluation import EvalConfig, PairEvaluator
from pipeline.done_index import EMPTY_INDEX, INDEX_DIR, build_done_index
from pipeline.inputs import is_image
from pipeline.output import list_parts, open_output, write_json_atomic
from pipeline.report import table1_markdown

PAIR_COLUMNS = ["sample_id", "hr", "lr"]
OVERWRITE_ADVICE = "rerun with --overwrite to replace them, or evaluate into a new --out"


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
        if info.type == pafs.FileType.File and is_image(name):
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


# ---- the job --------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig, on_part: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run the evaluation on Ray into `cfg.out` (a local folder) through `pipeline.output`, resuming
    the results OUT holds; returns the summary dict (`pipeline.eval_results.summarize`).
    `on_part({"part", "rows"})` sees each result part as it is committed (progress, tests).
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
        with using_ray(cfg.address):
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
    return summary


def _named(item: str, strip_suffix: bool = False) -> Tuple[str, str]:
    """NAME=PATH, or PATH alone (named after its base name, without its suffix with `strip_suffix`)."""
    if "=" in item:
        name, path = item.split("=", 1)
        return name, path
    name = os.path.basename(item.rstrip("/"))
    return (os.path.splitext(name)[0] if strip_suffix else name), item


def _check_baselines(cfg: EvalConfig) -> None:
    """Every baseline names a model these jobs can run (a one-line `ModelError` otherwise)."""
    from pipeline.sr_models import describe

    for _, model in cfg.baselines:
        describe(model)


def add_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--scale", type=int, default=4, help="SR factor of the pairs")
    p.add_argument("--metrics", nargs="*", default=list(LEARNED_METRICS), help="learned metrics (PSNR/SSIM always)")
    p.add_argument("--allow-download", action="store_true", help="let the metric library download weights")
    p.add_argument("--dataset-name", default="", help="dataset name shown in the tables and report")
    p.add_argument("--method-name", default="FlowSR", help="name of the checkpoint's rows in the tables")
    p.add_argument("--weights", default="student", choices=["student", "target"],
                   help="checkpoint weights: student, or target (the EMA)")
    p.add_argument("--pretrained", default=None, help="override the SD base model location recorded in the checkpoint")
    p.add_argument("--color-fix", default="none", choices=["none", "wavelet", "adain"],
                   help="colour correction of the SR output against the LR")
    p.add_argument("--tile", type=int, default=0, help="tile size in output pixels (0: whole images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image sampling noise")
    p.add_argument("--limit", type=int, default=None, help="score only the first N pairs")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per evaluator call")
    p.add_argument("--num-actors", type=int, default=1, help="evaluator actors (each loads the models once)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    p.add_argument("--report-images", type=int, default=4, help="images shown as side-by-side crops in the HTML report")
    p.add_argument("--crop-size", type=int, default=128, help="size of those crops, HR pixels")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results OUT holds instead of resuming them (needed when the inputs, settings "
                        "or checkpoint differ from the run that wrote them)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, run nothing")
    add_allow_errors_arg(p)
    add_ray_args(p)


def config_from_args(args) -> EvalConfig:
    return EvalConfig(data=args.data, out=args.out, lr_dir=args.lr_dir, checkpoint=args.checkpoint,
                      sr=tuple(_named(s) for s in args.sr),
                      baselines=tuple(_named(b, strip_suffix=True) for b in args.baseline), steps=tuple(args.steps),
                      scale=args.scale, metrics=tuple(args.metrics), allow_download=args.allow_download,
                      dataset_name=args.dataset_name, method_name=args.method_name, weights=args.weights,
                      pretrained=args.pretrained, color_fix=args.color_fix, tile=args.tile or None, seed=args.seed,
                      limit=args.limit, batch_size=args.batch_size, num_actors=args.num_actors, num_gpus=args.num_gpus,
                      report_images=args.report_images, crop_size=args.crop_size, address=args.address,
                      overwrite=args.overwrite)


def run(args) -> int:
    cfg = config_from_args(args)
    _check_baselines(cfg)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    summary = evaluate(cfg)
    print(table1_markdown(summary))
    print(json.dumps(summary["files"], indent=2))
    return exit_status(summary.get("errors", 0), args.allow_errors)  # pairs that could not be scored


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_main("evaluate", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
