import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (2 CPUs, capped object store)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def _group_alive(pgid):
    """Live (non-zombie) processes in process group `pgid`, read from /proc."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def _run_until_killed(argv, watch, timeout=300, quiet_s=2.0, **kwargs):
    """Run a job that SIGKILLs its own driver, then wait until nothing it started can still
    write: its own local Ray (the driver leads that process group) is killed outright, as a
    crashed machine would be, and `watch()` (a listing of the output) must hold still for
    `quiet_s`, since tasks of a killed driver on a shared Ray may finish their write."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 60
    last, since = watch(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = watch()
        if now != last:
            last, since = now, time.monotonic()
        elif not _group_alive(proc.pid) and time.monotonic() - since >= quiet_s:
            break
    return subprocess.CompletedProcess(argv, proc.returncode, None, err.decode(errors="replace"))


@pytest.fixture
def run_until_killed():
    """`_run_until_killed`: a job subprocess that SIGKILLs itself, and what it leaves settles."""
    return _run_until_killed


@pytest.fixture(scope="session")
def pixel_ckpt(tmp_path_factory):
    """A small pixel-space FlowSR checkpoint (random weights), saved as training saves one; built
    once per session (tests only read it)."""
    import torch

    from flowsr.backbones import PixelBackbone
    from flowsr.config import apply_overrides, preset

    cfg = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]"])
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("pixel_ckpt")
    cfg.save(str(directory / "config.json"))
    PixelBackbone.from_config(cfg.model).save_trainable(str(directory / "student"))
    return str(directory)


@pytest.fixture
def upscale_killed_at_first_output():
    """A `python -c` script: the upscale job (its argv after the script) whose driver SIGKILLs
    itself when the counts of its first written batch reach it."""
    return """import os, signal, sys
import ray.data
from jobs import upscale

iter_batches = ray.data.Dataset.iter_batches

def dying_iter_batches(self, *args, **kwargs):
    for batch in iter_batches(self, *args, **kwargs):
        if "ok" in batch.column_names:  # the counts of the first written batch reached the driver
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch

ray.data.Dataset.iter_batches = dying_iter_batches
upscale.main(sys.argv[1:])
"""
