"""Glue shared by every job: connecting to Ray and resolving storage URIs."""
from __future__ import annotations

import logging
import os
from typing import Optional

from pipeline.storage import is_local, resolve_fs  # noqa: F401  (re-exported for the jobs)

log = logging.getLogger("flowsr")
SUBMISSION_SCHEMES = ("http://", "https://")  # the dashboard / Jobs API, used by `ray job submit`


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             object_store_memory: Optional[int] = None, runtime_env: Optional[dict] = None):
    """Connect to `address` (or $RAY_ADDRESS); with neither, start a local Ray in-process.

    An http(s):// address is the job-submission API, not a cluster a driver can join: given as
    `address` it is a user mistake (ValueError, with what to do instead); found in $RAY_ADDRESS,
    where `ray job submit` wants it, it is ignored with a warning and the job runs locally.

    Returns True when this call started Ray (the caller may then shut it down).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address.startswith(SUBMISSION_SCHEMES):
        raise ValueError(f"--address {address} is a job-submission (dashboard) address, which a driver cannot "
                         f"connect to: submit the job with `ray job submit --address {address} -- flowsr JOB ...`, "
                         f"or connect with ray://HEAD:10001 (Ray Client) or HEAD:6379 from inside the cluster")
    env = os.environ.get("RAY_ADDRESS", "")
    if not address and env.startswith(SUBMISSION_SCHEMES):
        # `export RAY_ADDRESS=http://...:8265` is what `ray job submit` wants; a job run by hand in
        # that shell is meant to run here (on the cluster, Ray gives the job a GCS address instead)
        log.warning("RAY_ADDRESS=%s is a job-submission address, not one a driver can join: running on a "
                    "local Ray. To run on that cluster: ray job submit --address %s -- flowsr JOB ...",
                    env, env)
        os.environ.pop("RAY_ADDRESS")  # ray.init and Ray Train would read it again
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
