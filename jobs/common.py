"""Glue shared by every job: connecting to Ray, resolving storage URIs, logging and a quiet console."""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import sys
import threading
from typing import Callable, Optional, Sequence, TypeVar

from pipeline.actors import gpu_pool_size  # noqa: F401  (re-exported for the jobs)
from pipeline.storage import is_local, resolve_fs  # noqa: F401  (re-exported for the jobs)

log = logging.getLogger("flowsr")
SUBMISSION_SCHEMES = ("http://", "https://")  # the dashboard / Jobs API, used by `ray job submit`


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


def fit_actor_cpus(per_actor: float, actors: int, cluster_cpus: float, job: str) -> float:
    """Logical CPUs per model actor: `per_actor`, or less when `actors` of them would leave no
    whole CPU for the job's 1-CPU read / decode / write tasks, which would then never start (the
    job would wait forever)."""
    if cluster_cpus - actors * per_actor >= 1:
        return per_actor
    fitted = max(0.0, (cluster_cpus - 1) / actors)
    log.info("%s: %g CPU(s) per model actor instead of %g, so that reading and writing keep a CPU "
             "(the cluster has %g)", job, fitted, per_actor, cluster_cpus)
    return fitted


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
             object_store_memory: Optional[int] = None, runtime_env: Optional[dict] = None):
    """Connect to `address` (or $RAY_ADDRESS); with neither, start a local Ray in-process.

    An http(s):// address is the job-submission API, not a cluster a driver can join: given as
    `address` it is a user mistake (ValueError, with what to do instead); found in $RAY_ADDRESS,
    where `ray job submit` wants it, it is ignored with a warning and the job runs locally.

    Returns True when this call started Ray (the caller may then shut it down).
    """
    import ray

    setup_logging()  # every job connects here: its `flowsr` log lines get timestamps on stderr
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


# ---- logging -------------------------------------------------------------------------------------
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (so `quiet_console` sees the records)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """The `flowsr` loggers (every job, the trainer on Ray Train workers) with timestamps and
    levels on stderr; idempotent. Other libraries' loggers are left as they are."""
    logger = logging.getLogger("flowsr")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


# ---- a console without Ray's known noise -----------------------------------------------------------
# Lines that Ray 2.60 prints on a healthy local run; the full worker logs stay on disk under the
# session's logs folder (/tmp/ray/session_latest/logs).
RAY_NOISE = (
    # Train V2's placement-group cleaner thread dumps a traceback when it cannot query the state
    # API ("Failed to query", "Found multiple active Ray instances"); training is unaffected
    re.compile(r"\(PlacementGroupCleaner pid=\d+"),
    # the controller's PreemptionWatcher actor "has constructor arguments in the object store"
    # (and any actor of Ray Data's pools, restartable by design, on the driver's own stderr)
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    # the GCS killing an actor whose worker has already exited (Train's worker group between stages)
    # (with or without the RPC status that follows: "return status: Invalid: KillActor RPC failed")
    re.compile(r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor (?:[0-9a-f]+|NIL_ID)(?:,|$)"),
    # the hub lookup of optional kernels (no network here, and not needed)
    re.compile(r"kernels-community"),
    re.compile(r"Token authentication is enabled for this Ray cluster"),
    # Ray Data's per-dataset chatter (kept in the session's ray-data.log)
    re.compile(r"(Starting execution of|Execution plan of) Dataset|Progress bars disabled\. To enable"
               r"|Dataset \S+ execution finished in|INFO logging_progress\.py:\d+ -- "
               r"|Progress will be logged because stdout is a non-interactive terminal"),
    # a deprecation inside Ray Data's own Train integration, and the line it quotes
    re.compile(r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources`|self\.exclude_resources = exclude_resources"),
    # the raylet counting the short-lived Ray Data / Train workers of a small machine
    re.compile(r"\(raylet\).*PYTHON worker processes have been started on node"),
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACTOR_PREFIX = re.compile(r"^\((?:\w+) pid=\d+(?:, ip=[\d.]+)?\)\s?")
RECENT_LINES = 16  # a line equal to one of the last this many (actor prefix aside) is a repeat


class ConsoleFilter(io.TextIOBase):
    """A text stream in front of `stream` that drops lines matching `patterns` and repeats of a
    recent line (Ray can forward one worker line twice, with and without its actor prefix)."""

    def __init__(self, stream, patterns: Sequence[re.Pattern] = RAY_NOISE):
        self.stream, self.patterns = stream, patterns
        self.pending, self.dropped = "", 0
        self.recent = collections.deque(maxlen=RECENT_LINES)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if self.keep(line):
                self.stream.write(line + "\n")
            else:
                self.dropped += 1
        return len(text)

    def keep(self, line: str) -> bool:
        plain = ANSI.sub("", line)
        if any(p.search(plain) for p in self.patterns):
            return False
        body = ACTOR_PREFIX.sub("", plain).strip()
        if not body:
            return True
        if body in self.recent:
            return False
        self.recent.append(body)
        return True

    def flush(self) -> None:
        if self.pending and self.keep(self.pending):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


class NoiseRecordFilter(logging.Filter):
    """Drops log records of the driver's own Ray loggers that match `RAY_NOISE` (their handlers
    hold the stderr of the time Ray was imported, which `ConsoleFilter` may not be)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in RAY_NOISE)


def filter_native_stderr(fd: int = 2) -> None:
    """Route file descriptor `fd` (what Ray's C++ core worker writes its `core_worker.cc` lines
    to) through a `ConsoleFilter` for the rest of the process: a daemon thread pumps a pipe into
    the original descriptor. Child processes started afterwards inherit the pipe, so the thread
    keeps reading until the process ends."""
    original = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    target = ConsoleFilter(io.TextIOWrapper(os.fdopen(original, "wb", buffering=0), write_through=True))

    def pump():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for raw in iter(lambda: pipe.readline(), b""):
                target.write(raw.decode(errors="replace"))
                target.flush()

    threading.Thread(target=pump, name="flowsr-stderr-filter", daemon=True).start()


@contextlib.contextmanager
def quiet_console():
    """stdout / stderr through `ConsoleFilter`, noise records off Ray's driver loggers, and Ray
    Data's INFO progress logs off the console (they stay in the session's ray-data.log)."""
    ray_logger, data_logger = logging.getLogger("ray"), logging.getLogger("ray.data")
    saved = sys.stdout, sys.stderr, data_logger.level
    noise = NoiseRecordFilter()
    handlers = list(ray_logger.handlers)
    for handler in handlers:
        handler.addFilter(noise)
    sys.stdout, sys.stderr = ConsoleFilter(sys.stdout), ConsoleFilter(sys.stderr)
    data_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr, _ = saved
        data_logger.setLevel(saved[2])
        for handler in handlers:
            handler.removeFilter(noise)
