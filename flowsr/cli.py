"""The `flowsr` command. Each subcommand is registered by a small function that adds its parser
and sets `func` (called with the parsed args); add yours with `@command`.

    flowsr upscale -i IN -o OUT -m MODEL [-s 4] [--steps 1] [-t 128]
"""
from __future__ import annotations

import argparse
from typing import Callable, List

_REGISTRY: List[Callable] = []


def command(register: Callable) -> Callable:
    """Decorator: `register(subparsers)` adds one subcommand."""
    _REGISTRY.append(register)
    return register


@command
def _upscale(subparsers) -> None:
    from jobs.upscale import add_upscale_options, run_from_args

    p = subparsers.add_parser("upscale", help="upscale a folder, glob, file or Parquet list of images "
                                              "(a local Ray, or --address)")
    add_upscale_options(p)
    p.set_defaults(func=run_from_args)


@command
def _train(subparsers) -> None:
    from jobs.train import add_train_options, run_from_args

    p = subparsers.add_parser("train", help="two-stage FlowSR training on Ray Train (a local Ray, or --address)")
    add_train_options(p)
    p.set_defaults(func=run_from_args)


@command
def _demo(subparsers) -> None:
    from jobs.demo import add_demo_options, run_from_args

    p = subparsers.add_parser("demo", help="the embedded end-to-end demo on a local Ray (bundled images -> "
                                           "pairs -> stage 1 + 2 -> upscale -> HTML report)")
    add_demo_options(p)
    p.set_defaults(func=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsr", description="FlowSR on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _REGISTRY:
        register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()
