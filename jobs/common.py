"""Glue shared by every job: the command-line shape and exit status, connecting to Ray, a quiet console."""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import io
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Tuple, TypeVar

from pipeline.logs import setup_logging

log = logging.getLogger("flowsr")
SUBMISSION_SCHEMES = ("http://", "https://")  # the dashboard / Jobs API, used by `ray job submit`


T = TypeVar("T")


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


# ---- exit status: one rule for every job --------------------------------------------------------
# 0: the job finished and no input failed (or --allow-errors); 1: it finished and some inputs failed
# (error rows); 2: it stopped early with one line on stderr (a usage mistake, an output that cannot
# be written, a cluster that does not answer); 128 + N: it was stopped by signal N (130 SIGINT,
# 143 SIGTERM), committed results kept.
EXIT_OK, EXIT_ITEM_ERRORS, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(failed: int, allow_errors: bool = False) -> int:
    """The exit status of a job that finished with `failed` failed inputs (error rows)."""
    return EXIT_ITEM_ERRORS if failed and not allow_errors else EXIT_OK


def add_allow_errors_arg(parser) -> None:
    parser.add_argument("--allow-errors", action="store_true",
                        help="exit 0 even when some inputs failed (their error rows are written either way)")


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver: the job unwinds (its `finally` blocks run, Ray shuts
    down) and ends with one line and exit status 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    for sig in STOP_SIGNALS:  # a second signal while the job unwinds ends the process at once
        signal.signal(sig, _exit_now)
    _leave_running_tasks()
    raise Stopped(signum)


_ray_cancel: Optional[Callable] = None  # ray.cancel while a stopped job unwinds (see below)


def _leave_running_tasks() -> None:
    """While a stopped job unwinds, Ray Data cancels its running tasks one by one. In Ray 2.60 a
    cancel that crosses the task's own reply aborts the driver inside Ray's core ("Tried to complete
    task that was not pending", ray-project/ray#54846): exit 1 and a C++ stack instead of 128 + N
    and one line. The driver is leaving and its tasks end with it (Ray ends a job's workers when
    its driver disconnects), so `ray.cancel` does nothing until `run_job` returns."""
    global _ray_cancel
    ray = sys.modules.get("ray")
    if ray is None or _ray_cancel is not None or not hasattr(ray, "cancel"):
        return
    _ray_cancel, ray.cancel = ray.cancel, lambda *args, **kwargs: None


def _restore_ray_cancel() -> None:
    global _ray_cancel
    if _ray_cancel is not None:
        sys.modules["ray"].cancel, _ray_cancel = _ray_cancel, None


def _exit_now(signum, frame):
    os._exit(128 + signum)


def stop_on_signals() -> dict:
    """SIGINT and SIGTERM raise `Stopped` in the driver's main thread (a second one exits at once).
    `init_ray` calls it again after `ray.init`, which installs a SIGTERM handler of its own.
    Returns the handlers it replaced ({} off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}


def user_error_message(err: BaseException) -> str:
    """The message of a user mistake, without the remote traceback Ray wraps around it."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError / ActorDiedError
    return user_error_message(cause) if isinstance(cause, BaseException) else str(err).strip().splitlines()[0]


# errnos of an output that cannot be written: a full disk or quota, a read-only or missing mount,
# no permission, a file where a folder should be
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                 errno.EEXIST, errno.EIO, errno.EFBIG)


# how a worker's traceback names an OSError: "OSError: [Errno 28] ... No space left on device"
REMOTE_OSERROR = re.compile(r"^\w*(?:Error|Exception): \[Errno (\d+)\] (.*)$", re.M)


def storage_error(err: BaseException) -> Optional[OSError]:
    """The OSError of a storage problem in `err`'s chain (its causes, the cause a Ray task error
    carries), or None. A full disk inside a Ray Data task reaches the driver as a RayTaskError
    around Ray Data's UserCodeException, whose own cause does not survive pickling: there the
    worker's traceback, in the error's text, names the OSError, and it is read back from it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
            return err
        remote = [m for m in REMOTE_OSERROR.finditer(_remote_traceback(err)) if int(m.group(1)) in OUTPUT_ERRNOS]
        if remote:
            code, text = int(remote[-1].group(1)), remote[-1].group(2)
            return OSError(code, os.strerror(code), *(_quoted(text) or ()))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _remote_traceback(err: BaseException) -> str:
    """The worker traceback a Ray task error carries in its text ("" for other errors)."""
    try:
        from ray.exceptions import RayError
    except ImportError:
        return ""
    return str(err) if isinstance(err, RayError) else ""


def _quoted(text: str) -> Optional[tuple]:
    """(path,) when `text` (an OSError's message) names one in quotes, else None."""
    match = re.search(r"'([^']+)'", text)
    return (match.group(1),) if match else None


def _storage_message(err: OSError) -> str:
    """"No space left on device (PATH)": the reason, and the path when the error names one
    (pyarrow names it in its message: "Cannot create directory '/x'")."""
    where = err.filename or (_quoted(str(err)) or ("",))[0]
    reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
    return f"{reason}{f' ({where})' if where else ''}"


def run_job(name: str, call: Callable[[], object]) -> int:
    """Run a job's `call()` as its command line does and return the exit status (the rule above):
    a user mistake (a missing weight, a bad value, a missing file, an unusable output or cluster)
    and a storage failure (a full disk mid-run) end in one line on stderr and exit 2; SIGINT and
    SIGTERM stop it cleanly (exit 130 / 143); an int result is the status, anything else 0.
    Set FLOWSR_TRACEBACK=1 for the tracebacks."""
    from flowsr.weights import MissingWeightsError

    setup_logging()
    previous = stop_on_signals()
    try:
        result = call()
    except KeyboardInterrupt as err:  # Stopped, or a KeyboardInterrupt raised before our handler ran
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"flowsr {name}: stopped by {signal.Signals(signum).name}; committed results are kept, "
              f"nothing is marked finished: rerun the same command to complete the run", file=sys.stderr, flush=True)
        return 128 + signum
    except Exception as err:  # noqa: BLE001 — sorted below; anything else keeps its traceback
        if os.environ.get("FLOWSR_TRACEBACK"):
            raise
        stored = storage_error(err)
        if stored is not None:
            print(f"flowsr {name}: error: {_storage_message(stored)}; committed results are kept, "
                  f"rerun the same command to resume", file=sys.stderr, flush=True)
            return EXIT_USAGE
        if not isinstance(err, (MissingWeightsError, FileNotFoundError, ValueError)):
            raise
        print(f"flowsr {name}: error: {user_error_message(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        for sig, handler in previous.items():  # the caller's handlers again (a test, a notebook)
            signal.signal(sig, handler)
        _restore_ray_cancel()
    return result if isinstance(result, int) else EXIT_OK


# ---- one command-line shape ------------------------------------------------------------------------
# Every job module has `add_options(parser)` (its flags, defaults from its config dataclass) and
# `run(args) -> int`; `python -m jobs.X` and `flowsr NAME` both go through `job_main` / `run_job`.
def job_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of job `name`: its module's options, each with its default in the help."""
    parser = argparse.ArgumentParser(prog=f"flowsr {name}", description=(module.__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_options(parser)
    return parser


def job_main(name: str, module, argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jobs.X ARGS` (= `flowsr NAME ARGS`): parse, then `module.run(args)` under
    `run_job` (its exit status)."""
    args = job_parser(name, module).parse_args(argv)
    return run_job(name, lambda: module.run(args))


# ---- connecting to Ray ------------------------------------------------------------------------------
CONNECT_TIMEOUT_S = 10.0  # how long a cluster address may take to accept a connection


class ClusterUnreachable(ValueError):
    """Nothing answers at the cluster address (one line)."""


def _host_port(address: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a GCS (HOST:PORT) or Ray Client (ray://HOST:PORT) address; None for
    `auto`, `local` or anything without a port."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_address(address: Optional[str], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterUnreachable unless something accepts a TCP connection at the cluster `address`
    within `timeout_s` (ray.init would retry for ever). Called before a job touches its output."""
    target = _host_port(address) if address else None
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            if time.monotonic() + 0.5 >= deadline:
                raise ClusterUnreachable(f"--address {address}: no Ray cluster answers there "
                                         f"({err.strerror or err}, for {timeout_s:g} s); start it or check the "
                                         f"address") from None
            time.sleep(0.5)


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
    stopping = signal.getsignal(signal.SIGTERM) is _raise_stopped  # a job run by `run_job`
    if address:
        check_address(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
                 runtime_env=runtime_env, include_dashboard=False)
    if stopping:
        stop_on_signals()  # ray.init installs a SIGTERM handler of its own, which aborts the driver
    return True


def connect_first(address: Optional[str] = None) -> bool:
    """Connect now to the cluster a job is given (`address`, else $RAY_ADDRESS), before the job
    touches its output: a wrong address fails in one line with nothing written. Without one the
    job starts its local Ray later, when it has work (a refusal stays instant). Returns True when
    this call connected (the caller then shuts Ray down)."""
    env = os.environ.get("RAY_ADDRESS", "")
    if not address and (not env or env.startswith(SUBMISSION_SCHEMES)):
        return False
    return init_ray(address)


@contextlib.contextmanager
def using_ray(address: Optional[str] = None, *, only_a_cluster: bool = False, **init_kwargs):
    """Ray for the block, shut down on leaving when the block started it (never a Ray that was
    already running). Connects to `address` / $RAY_ADDRESS, else starts a local Ray (`init_ray`).
    `only_a_cluster`: connect only when a cluster address is given (`connect_first`: a job checks
    its cluster before it touches its output, and starts a local Ray later, with its work).
    Yields True when this block started Ray."""
    started = connect_first(address) if only_a_cluster else init_ray(address, **init_kwargs)
    try:
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()


def add_ray_args(parser) -> None:
    """The flags every job takes to find its cluster."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


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
