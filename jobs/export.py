"""Export a FlowSR checkpoint's one-step model to ONNX (`flowsr.export`).

    flowsr export CKPT OUT.onnx [--dtype fp32|fp16] [--opset 20] [--tolerance T]
    (= python -m jobs.export CKPT OUT.onnx ...)

The LoRA is merged into the UNet; batch, height and width stay dynamic. The written file is run in
onnxruntime on a few inputs first and refused (nothing written, exit 2) when it differs from
torch by more than the tolerance. The last stdout line is the report as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

DTYPES = ("fp32", "fp16")  # = flowsr.export.DTYPES (not imported here: it loads torch)
DEFAULT_OPSET = 20  # = flowsr.export.DEFAULT_OPSET


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a FlowSR checkpoint folder (or URI)")
    p.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write (weights over 2 GiB go to OUT.onnx.data)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp16 computes in float16 inside; input and output stay float32")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |onnxruntime - torch| on outputs in [-1, 1] before the export is refused "
                        "(default 2e-3 for fp32, 1e-1 for fp16)")
    p.add_argument("--pretrained", default=None, help="override the SD base model location (SD checkpoints)")
    p.add_argument("--weights", choices=("student", "target"), default="student", help="weights to export")


def run(args: argparse.Namespace) -> int:
    """Export; a missing checkpoint or a refused export raises (one stderr line, exit 2, `run_job`)."""
    from flowsr.export import export_checkpoint
    from pipeline.storage import cached_copy

    if not args.output.endswith(".onnx"):
        raise ValueError(f"the output must be an .onnx file, got {args.output}")
    report = export_checkpoint(cached_copy(args.checkpoint), args.output, dtype=args.dtype, opset=args.opset,
                               tolerance=args.tolerance, pretrained=args.pretrained, weights=args.weights)
    print(f"[export] wrote {report.path}: max |onnxruntime - torch| = {report.max_error:.3g} "
          f"(tolerance {report.tolerance:g}), {report.parameters} parameters, {report.seconds} s",
          file=sys.stderr, flush=True)
    print(json.dumps(dataclasses.asdict(report)))
    return 0


def main(argv=None) -> int:
    from jobs.common import job_main

    return job_main("export", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
