"""The single-writer lease of an output folder (`_lease.json`).

A second run on the same output refuses with one line (`OutputBusy`); a lease left by a killed
run is taken over (same host and its pid is gone, or its heartbeat is older than the lease's
ttl). The holder refreshes the heartbeat from a daemon thread. Exclusivity is exact on local
filesystems (O_EXCL create, rename aside) and on S3 (conditional writes: `If-None-Match: *` to
create, `If-Match: <etag>` to refresh, take over or release); on other object stores (gs://) it
is a write-then-verify check that two runs starting within the same ~0.2 s can both pass.
`pipeline.output.open_output` holds it for the whole of a job's writing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

import pyarrow.fs as pafs

from pipeline.output import LEASE_FILE, LEASE_TTL_S, OutputBusy, parent_dir, read_json, write_bytes_atomic
from pipeline.storage import versioned_store

log = logging.getLogger("flowsr.output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_is_stale(lease: Dict[str, Any], now: Optional[float] = None) -> bool:
    """True when the lease's holder is gone: same host and dead pid, or heartbeat too old."""
    now = time.time() if now is None else now
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1))):
        return True
    return now - float(lease.get("heartbeat", 0)) > float(lease.get("ttl_s", LEASE_TTL_S))


class Lease:
    """The single-writer lease of one output; `acquire()` then `release()` (or `with`)."""

    def __init__(self, fs: pafs.FileSystem, root: str, label: str, ttl_s: float = LEASE_TTL_S):
        self.fs, self.path, self.label, self.ttl_s = fs, f"{root}/{LEASE_FILE}", label, ttl_s
        self.token = uuid.uuid4().hex
        self._local = isinstance(fs, pafs.LocalFileSystem)
        self._store = None if self._local else versioned_store(fs)  # S3: conditional writes
        self.version: Optional[str] = None  # the lease object's version while held (S3)
        self.lost = False  # another run took the lease over (its heartbeat had stopped for ttl_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "ttl_s": self.ttl_s}).encode()

    def _create(self) -> bool:
        """Create the lease file if there is none; True when this call created it."""
        if self._local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        if self._store is not None:
            self.version = self._store.create_if_absent(self.path, self._body()) or self._own_version()
            return self.version is not None
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            return False
        write_bytes_atomic(self.fs, self.path, self._body())
        time.sleep(0.2)  # object stores have no exclusive create: write, then check we won
        held = read_json(self.fs, self.path)
        return bool(held) and held.get("token") == self.token

    def _take_over(self, stale: Dict[str, Any]) -> None:
        """Remove a stale lease, unless another run replaced it meanwhile."""
        if self._local:
            aside = f"{self.path}.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
            if moved.get("token") != stale.get("token"):  # a live lease: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
            os.remove(aside)
            return
        current = read_json(self.fs, self.path)
        if current and current.get("token") == stale.get("token"):
            self.fs.delete_file(self.path)

    def _own_version(self) -> Optional[str]:
        """The lease object's version when it holds this run's token, else None: a conditional
        write whose answer was lost, retried by the client, fails against its own success."""
        held, version = self._read()
        return version if held and held.get("token") == self.token else None

    def _read(self) -> tuple:
        """(the lease's JSON, its version) or (None, None); the version only on S3."""
        if self._store is None:
            return read_json(self.fs, self.path), None
        found = self._store.read(self.path)
        return (json.loads(found[0] or b"{}"), found[1]) if found else (None, None)

    def acquire(self) -> "Lease":
        self.fs.create_dir(parent_dir(self.path), recursive=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            held, version = self._read()
            if held is None:
                continue
            if not lease_is_stale(held):
                raise OutputBusy(f"{self.label} is in use by another run (pid {held.get('pid')} on "
                                 f"{held.get('host')}, heartbeat {time.time() - held.get('heartbeat', 0):.0f} s "
                                 f"ago); wait for it or write to another output")
            if self._store is not None:  # replace exactly the stale version: one taker wins
                self.version = self._store.replace_if_version(self.path, self._body(), version) or self._own_version()
                if self.version is not None:
                    self._start_heartbeat()
                    return self
                continue
            self._take_over(held)
        raise OutputBusy(f"{self.label}: could not take its lease; another run keeps replacing it")

    def _refresh(self) -> None:
        """One heartbeat. On S3 only the version this run wrote is replaced: a lease taken over
        meanwhile is never overwritten (`lost` is set and the heartbeat stops)."""
        if self._store is not None:
            self.version = (self._store.replace_if_version(self.path, self._body(), self.version)
                            or self._own_version())
            if self.version is None:
                self.lost = True
                self._stop.set()
                log.warning("%s: lease taken over by another run (this run's heartbeat had stopped for "
                            "%.0f s); both may now write to it", self.label, self.ttl_s)
            return
        held = read_json(self.fs, self.path)
        if held and held.get("token") == self.token:
            write_bytes_atomic(self.fs, self.path, self._body())

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.ttl_s / 4):
                with contextlib.suppress(Exception):
                    self._refresh()

        self._thread = threading.Thread(target=beat, name="output-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self._store is not None:
                if self.version is not None and not self.lost:
                    self._store.delete_if_version(self.path, self.version)
                return
            held = read_json(self.fs, self.path)
            if held and held.get("token") == self.token:
                self.fs.delete_file(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

