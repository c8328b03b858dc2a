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
from typing import Callable, Dict

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default

# jobs whose own parser is used as is: `flowsr NAME ARGS` runs `jobs.MODULE.main(ARGS)`
DELEGATED: Dict[str, tuple] = {
    "prepare-data": ("prepare_data", "LR/HR pairs from a folder or URI of images (Real-ESRGAN degradations, "
                                     "captions) into Parquet shards"),
    "caption": ("caption", "(re)generate the captions of existing pair shards (template or Qwen2-VL) into a "
                           "caption table joined on sample_id"),
    "evaluate": ("evaluate", "PSNR / SSIM / learned metrics of a checkpoint or SR folders in the paper's "
                             "Table-1 layout"),
    "ablate": ("ablate", "the paper's Table 2-4 ablations at small scale"),
}


# jobs whose options `flowsr` adds itself: NAME -> (module, its add-options function, help)
REGISTERED: Dict[str, tuple] = {
    "upscale": ("upscale", "add_upscale_options",
                "upscale a folder, glob, file or Parquet list of images (a local Ray, or --address)"),
    "train": ("train", "add_train_options", "two-stage FlowSR training on Ray Train (a local Ray, or --address)"),
    "export": ("export", "add_export_options", "export a checkpoint's one-step model to ONNX (checked against torch "
                                               "in onnxruntime before it is written)"),
    "demo": ("demo", "add_demo_options", "the embedded end-to-end demo on a local Ray (bundled images -> pairs -> "
                                         "stage 1 + 2 -> upscale -> HTML report)"),
}


def _add_registered(subparsers, name: str) -> None:
    """`flowsr NAME`: the job module's options; `func` is its `run_from_args`."""
    module_name, add_options, text = REGISTERED[name]
    module = importlib.import_module(f"jobs.{module_name}")
    p = subparsers.add_parser(name, formatter_class=DEFAULTS, help=text)
    getattr(module, add_options)(p)
    p.set_defaults(func=module.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsr", description=__doc__.split("\n\n")[0],
                                     epilog="`flowsr JOB --help` shows the options of JOB.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="JOB")
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    for name in REGISTERED:
        _add_registered(sub, name)
    return parser


def _run(command: str, call: Callable[[], object]) -> int:
    """`jobs.common.run_job`: the exit-status rule, one line for a user mistake, clean stops."""
    from jobs.common import run_job

    return run_job(command, call)


def main(argv=None) -> int:
    from jobs.common import setup_logging

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(f"jobs.{DELEGATED[argv[0]][0]}")
        return _run(argv[0], lambda: module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    return _run(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
