"""The `flowsr` command: one subcommand per job.

    flowsr prepare-data --input photos/ --output data/      (= python -m jobs.prepare_data ...)
    flowsr caption --shards data/shards --output captions/  (= python -m jobs.caption ...)
    flowsr train --config paper --data data/shards ...       (= python -m jobs.train ...)
    flowsr upscale -i IN -o OUT -m MODEL [-s 4] [--steps 1] [-t 128] [--backend onnxruntime]
    flowsr export CKPT OUT.onnx [--dtype fp16]
    flowsr evaluate --data eval/shards --checkpoint CKPT --out eval_out
    flowsr ablate --out ablations
    flowsr demo

`flowsr JOB --help` shows a job's options. Exit status, the same for every job
(`jobs.common.run_job`): 0 done (with `--allow-errors`, also when some inputs failed), 1 done but
some inputs failed (their error rows are written), 2 stopped early with one line on stderr (a
usage mistake, an output that cannot be written, a cluster that does not answer), 130 / 143
stopped by SIGINT / SIGTERM (committed results kept; rerun to complete). Set FLOWSR_TRACEBACK=1
for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, Tuple

from jobs.common import run_job

# NAME -> (module under jobs/, help); each module has `add_options(parser)` and `run(args) -> int`
JOBS: Dict[str, Tuple[str, str]] = {
    "prepare-data": ("prepare_data", "LR/HR pairs from a folder or URI of images (Real-ESRGAN degradations, "
                                     "captions) into Parquet shards"),
    "caption": ("caption", "(re)generate the captions of existing pair shards (template or Qwen2-VL) into a "
                           "caption table joined on sample_id"),
    "train": ("train", "two-stage FlowSR training on Ray Train (a local Ray, or --address)"),
    "upscale": ("upscale", "upscale a folder, glob, file or Parquet list of images (a local Ray, or --address)"),
    "export": ("export", "export a checkpoint's one-step model to ONNX (checked against torch in onnxruntime "
                         "before it is written)"),
    "evaluate": ("evaluate", "PSNR / SSIM / learned metrics of a checkpoint or SR folders in the paper's "
                             "Table-1 layout"),
    "ablate": ("ablate", "the paper's Table 2-4 ablations at small scale"),
    "demo": ("demo", "the embedded end-to-end demo on a local Ray (bundled images -> pairs -> stage 1 + 2 -> "
                     "upscale -> HTML report)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsr", description=__doc__.split("\n\n")[0],
                                     epilog="`flowsr JOB --help` shows the options of JOB.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="JOB")
    for name, (module_name, text) in JOBS.items():
        module = importlib.import_module(f"jobs.{module_name}")
        p = sub.add_parser(name, help=text, description=(module.__doc__ or "").split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_options(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_job(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
