"""Glue shared by every job: connecting to Ray and resolving storage URIs."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, TypeVar

from pipeline.storage import is_local, resolve_fs  # noqa: F401  (re-exported for the jobs)


T = TypeVar("T")


def config_or_exit(build: Callable[[], T]) -> T:
    """`build()`, with a config mistake (`flowsr.config.ConfigError`: a bad `--set` value, an
    unknown key, an unreadable config file) turned into one line on stderr and exit status 2."""
    from flowsr.config import ConfigError

    try:
        return build()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             object_store_memory: Optional[int] = None, runtime_env: Optional[dict] = None):
    """Connect to `address` (or $RAY_ADDRESS); with neither, start a local Ray in-process.

    Returns True when this call started Ray (the caller may then shut it down).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
                 runtime_env=runtime_env, include_dashboard=False)
    return True


def add_ray_args(parser) -> None:
    """The flags every job takes to find its cluster."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
