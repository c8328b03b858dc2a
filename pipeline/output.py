"""One resumable-output layer for every job that writes results under an output folder or URI.

What a job gets from `open_output(...)`:

* **a lease** (`_lease.json`): one writer per output. A second run refuses with one line; a
  lease left by a killed run is taken over (same host and its pid is gone, or its heartbeat is
  older than the lease's ttl). The holder refreshes the heartbeat from a daemon thread.
* **a run record** (`_run.json`): what produced the results — the job, its input, the
  parameters that change results, the checkpoint digest and the code version. It is written on
  the first run and compared on every rerun; a difference in the job, the parameters or the
  checkpoint is refused with one line naming the fields (`--overwrite` or a new output to
  proceed). The input and the code version are recorded, not compared: identities come from
  content, so a moved input resumes, and a code change that changes results bumps a parameter
  version (e.g. the degradation's `PARAMS_VERSION`).
* **atomic commits**: every file is written under a dot-prefixed temporary name in its final
  directory (pyarrow and Ray readers skip dot-files) and renamed when complete; temporary
  files of killed runs are removed once the lease is held.
* **resume state read from committed parts**: `DoneIndex` is built inside Ray Data from the id
  column of the committed parts (hash-partitioned into bucket files of about
  `rows_per_bucket` ids each); a task asks `index.done(ids)` and loads only the buckets of those
  ids. Neither the driver nor a task ever holds every finished id.

All storage goes through `pyarrow.fs` (`pipeline.storage.resolve_fs`): local paths, file://,
s3://, gs://. On an object store a "rename" is a server-side copy and a delete: the final object
still appears whole or not at all (a killed run leaves at most a temporary object, removed by
the next run), but each part is written twice. Lease exclusivity is exact on local filesystems
(O_EXCL create, rename aside) and on S3 (conditional writes: `If-None-Match: *` to create,
`If-Match: <etag>` to refresh, take over or release); on other object stores (gs://) it is a
write-then-verify check that two runs starting within the same ~0.2 s can both pass.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import is_local, join_uri, resolve_fs, versioned_store

TMP_PREFIX = ".tmp-"
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
RUN_FILE = "_run.json"
LEASE_FILE = "_lease.json"
INDEX_DIR = "_resume"  # bucket files of finished ids, rebuilt by every run that resumes
LEASE_TTL_S = 120.0  # a lease whose heartbeat is older than this is stale
ROWS_PER_BUCKET = 50_000  # finished ids per DoneIndex bucket file (~1 MB)
ROW_GROUP_ROWS = 64
COMPARED_FIELDS = ("job", "params", "checkpoint")
log = logging.getLogger("flowsr.output")


class OutputError(ValueError):
    """A user mistake about an output folder; the message is one line meant for stderr."""


class RunMismatch(OutputError):
    """The output holds results of a run with other settings."""


class OutputBusy(OutputError):
    """Another live run holds the output's lease."""


# ---------------------------------------------------------------------------------------------
# Atomic writes and committed parts
# ---------------------------------------------------------------------------------------------

def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` through `.tmp-<uuid>-<name>` in the same directory, then rename it."""
    directory, name = _parent(path), path.rsplit("/", 1)[-1]
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.get_file_info(tmp).type == pafs.FileType.File:
                fs.delete_file(tmp)
        raise


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    atomic_write(fs, path, lambda stream: stream.write(data))


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode())


def create_if_absent(fs: pafs.FileSystem, path: str, data: bytes) -> bool:
    """Write `data` at `path` whole unless a file is there already; True when this call wrote it.

    Exact on a local filesystem (a temporary file hard-linked into place: the link fails when
    the name exists) and on S3 (`If-None-Match: *`); elsewhere (gs://, a local filesystem
    without hard links) a check, then an atomic write.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        directory, name = _parent(path), path.rsplit("/", 1)[-1]
        fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: fall back to the check below
            pass
        finally:
            os.remove(tmp)
    store = versioned_store(fs)
    if store is not None:
        return store.create_if_absent(path, data) is not None
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    write_bytes_atomic(fs, path, data)
    return True


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table,
                         row_group_size: int = ROW_GROUP_ROWS) -> None:
    atomic_write(fs, path, lambda stream: pq.write_table(table, stream, row_group_size=row_group_size))


def remove_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete the folder `path` and what it holds, if it exists (a job's working folder)."""
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove_file(uri: str) -> None:
    """Delete the file at `uri`, if there is one."""
    fs, path = resolve_fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def read_json(fs: pafs.FileSystem, path: str) -> Optional[Any]:
    """The JSON at `path`, or None when there is no file."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def content_part_name(keys: Iterable[str]) -> str:
    """`part-<hash>.parquet` named by the ids it holds: a retried write replaces, never duplicates."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{digest}{PARQUET_SUFFIX}"


def list_parts(fs: pafs.FileSystem, directory: str, prefix: str = PART_PREFIX,
               suffix: str = PARQUET_SUFFIX) -> List[str]:
    """Committed part files in `directory` (sorted paths); [] when it does not exist."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(prefix) and i.base_name.endswith(suffix))


def part_rows(fs: pafs.FileSystem, paths: Sequence[str]) -> List[int]:
    """Row counts of Parquet parts, from their footers."""
    counts = []
    for path in paths:
        with fs.open_input_file(path) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return counts


def _local_files(root: str, recursive: bool) -> Iterator[str]:
    """Regular files under the local folder `root` (in it only, when not `recursive`)."""
    if not recursive:
        with contextlib.suppress(FileNotFoundError):
            yield from (e.path for e in os.scandir(root) if e.is_file(follow_symlinks=False))
        return
    for directory, _, files in os.walk(root):
        yield from (os.path.join(directory, name) for name in files)


def clear_tmp(fs: pafs.FileSystem, root: str, recursive: bool = True) -> int:
    """Delete the temporary files killed runs left anywhere under `root` (in `root` itself only,
    when not `recursive`); returns how many.

    Only call it while holding the lease: a live writer's temporary files look the same.
    """
    if isinstance(fs, pafs.LocalFileSystem):  # os, not pyarrow: an output may hold names that are not UTF-8
        stale = [path for path in _local_files(root, recursive) if os.path.basename(path).startswith(TMP_PREFIX)]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
        stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(TMP_PREFIX)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path) if isinstance(fs, pafs.LocalFileSystem) else fs.delete_file(path)
    return len(stale)


# ---------------------------------------------------------------------------------------------
# Identities and versions
# ---------------------------------------------------------------------------------------------

def bytes_digest(data: bytes) -> str:
    """Content identity of a file: sha256 of its bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


LARGE_FILE_BYTES = 64 << 20
EDGE_BYTES = 8 << 20


def checkpoint_digest(uri: Optional[str]) -> Optional[str]:
    """Digest of a checkpoint file or directory (every file's relative name, size and bytes).

    Files above 64 MB contribute their size, first and last 8 MB (a full read of multi-GB
    weights would dominate a small run). None for None.
    """
    if not uri:
        return None
    fs, root = resolve_fs(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        files = [info]
    elif info.type == pafs.FileType.Directory:
        files = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                        if i.type == pafs.FileType.File and not i.base_name.startswith(".")),
                       key=lambda i: i.path)
    else:
        raise OutputError(f"checkpoint not found: {uri}")
    digest = hashlib.sha256()
    for item in files:
        name = "" if item is info else os.path.relpath(item.path, root)
        digest.update(f"{name}|{item.size}|".encode())
        with fs.open_input_file(item.path) as f:
            if item.size <= LARGE_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(EDGE_BYTES))
                f.seek(item.size - EDGE_BYTES)
                digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`flowsr <version>` plus the git commit of the checkout, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"flowsr {version('flowsr-ray')}"  # the distribution's name (pyproject.toml)
    except PackageNotFoundError:  # running from a source tree that was never installed
        text = "flowsr"
    here = os.path.dirname(os.path.abspath(__file__))
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            text += f" ({commit})"
    return text


# ---------------------------------------------------------------------------------------------
# Run record
# ---------------------------------------------------------------------------------------------

def run_record(job: str, input: Any, params: Dict[str, Any], checkpoint: Optional[str] = None
               ) -> Dict[str, Any]:
    """What produced an output's results (written as `_run.json`)."""
    return {"job": job, "input": input, "params": params, "checkpoint": checkpoint,
            "code_version": code_version()}


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    changed = []
    for field in COMPARED_FIELDS:
        a, b = old.get(field), new.get(field)
        if field == "params" and isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
        elif a != b:
            shorten = (lambda v: v[:12] if isinstance(v, str) and field == "checkpoint" else v)
            changed.append(f"{field}: {shorten(a)!r} -> {shorten(b)!r}")
    return changed


OVERWRITE_ADVICE = "rerun with --overwrite or write to a new --output"


def check_run_record(fs: pafs.FileSystem, root: str, record: Dict[str, Any], *, label: str,
                     advice: str = OVERWRITE_ADVICE) -> bool:
    """Write `record` on the first run; refuse a rerun whose compared fields differ.

    Returns True when the output already had a (matching) record, i.e. this run resumes.
    """
    path = f"{root}/{RUN_FILE}"
    old = read_json(fs, path)
    if old is None:  # first run, unless another first run records its settings meanwhile
        if create_if_absent(fs, path, json.dumps(record, indent=2, sort_keys=True).encode()):
            return False
        old = read_json(fs, path) or {}
    changed = _differences(old, record)
    if changed:
        raise RunMismatch(f"{label} holds results of another run ({'; '.join(changed)}); {advice}")
    return True


# ---------------------------------------------------------------------------------------------
# Lease
# ---------------------------------------------------------------------------------------------

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
        self.fs.create_dir(_parent(self.path), recursive=True)
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


# ---------------------------------------------------------------------------------------------
# An opened output: lease + run record + clean temporaries
# ---------------------------------------------------------------------------------------------

@dataclass
class Output:
    uri: str
    fs: pafs.FileSystem
    root: str
    resumed: bool  # the output held results of the same settings
    cleared: int = 0  # temporary files of killed runs removed on opening

    def path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def uri_of(self, *names: str) -> str:
        return join_uri(self.uri, *names)


def _remove_results(fs: pafs.FileSystem, root: str) -> None:
    """--overwrite: delete everything under `root` except the lease."""
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.base_name == LEASE_FILE:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


@contextlib.contextmanager
def open_output(uri: str, record: Dict[str, Any], *, overwrite: bool = False,
                remove_results: bool = True, ttl_s: float = LEASE_TTL_S,
                advice: str = OVERWRITE_ADVICE, clear_recursive: bool = True) -> Iterator[Output]:
    """Hold `uri`'s lease, check (or write) its run record, clear stale temporaries.

    overwrite: replace the run record; with `remove_results` also delete the output's earlier
    results first (the lease makes this safe). A job whose outputs are files named after its
    inputs (upscale) keeps them and rewrites each one instead.
    Raises OutputBusy / RunMismatch (one-line OutputErrors) before anything is written;
    `advice` ends a RunMismatch's line (the job's own flag names).
    clear_recursive=False clears stale temporaries in the output's top folder only: for a job
    whose output holds a file per input (upscale) and that clears its own working folders.
    """
    fs, root = resolve_fs(uri)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as err:  # a file where a folder should be, no permission, a read-only mount
        raise OutputError(f"cannot create the output folder {uri}: {err.strerror or err}") from err
    with Lease(fs, root, uri, ttl_s=ttl_s):
        if overwrite and remove_results:
            _remove_results(fs, root)
        elif overwrite:
            fs.delete_file(f"{root}/{RUN_FILE}") if fs.get_file_info(f"{root}/{RUN_FILE}").is_file else None
        resumed = check_run_record(fs, root, record, label=uri, advice=advice)
        cleared = clear_tmp(fs, root, recursive=clear_recursive)
        yield Output(uri=uri, fs=fs, root=root, resumed=resumed, cleared=cleared)


# ---------------------------------------------------------------------------------------------
# Resume state: finished ids, hash-partitioned, built and read inside Ray Data tasks
# ---------------------------------------------------------------------------------------------

def id_bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    """Bucket of each id string (crc32 mod `buckets`): the same in every process."""
    return np.fromiter((zlib.crc32(s.encode()) % buckets for s in ids.to_pylist()), np.int64,
                       count=len(ids))


def _bucket_ids(batch: pa.Table, column: str, buckets: int) -> pa.Table:
    ids = batch.column(column).combine_chunks()
    return pa.table({"id": ids, "bucket": pa.array(id_bucket(ids, buckets))})


def _write_bucket(group: pa.Table, fs_uri: str, directory: str) -> pa.Table:
    fs, _ = resolve_fs(fs_uri)
    bucket = int(group.column("bucket")[0].as_py())
    ids = pc.unique(group.column("id"))
    write_parquet_atomic(fs, f"{directory}/bucket-{bucket:06d}{PARQUET_SUFFIX}",
                         pa.table({"id": ids}), row_group_size=1 << 20)
    return pa.table({"bucket": [bucket], "ids": [len(ids)]})


@dataclass(frozen=True)
class DoneIndex:
    """Finished ids of an output, as `buckets` Parquet files under `directory` (a URI).

    `done(ids)` loads only the buckets those ids fall in (a few cached per process).
    """

    directory: str
    buckets: int

    def done(self, ids: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of `ids` are finished."""
        if self.buckets == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        array = pa.array(list(ids), pa.string())
        where = id_bucket(array, self.buckets)
        mask = np.zeros(len(ids), bool)
        for bucket in np.unique(where):
            members = _load_bucket(self.directory, int(bucket))
            rows = np.flatnonzero(where == bucket)
            found = pc.is_in(array.take(pa.array(rows)), value_set=members).to_numpy(zero_copy_only=False)
            mask[rows] = found
        return mask


EMPTY_INDEX = DoneIndex(directory="", buckets=0)


@functools.lru_cache(maxsize=8)
def _load_bucket(directory: str, bucket: int) -> pa.Array:
    fs, root = resolve_fs(directory)
    path = f"{root}/bucket-{bucket:06d}{PARQUET_SUFFIX}"
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f).column("id").combine_chunks()
    except FileNotFoundError:  # no finished id fell in this bucket
        return pa.array([], pa.string())


def build_done_index(output: Output, parts: Sequence[str], column: str, name: str,
                     rows_per_bucket: int = ROWS_PER_BUCKET) -> DoneIndex:
    """The `column` ids of committed `parts` (paths on output.fs) as a DoneIndex, via Ray Data.

    The ids go from the parts' id column through a hash shuffle (Ray Data groupby) into bucket
    files under `_resume/<name>/<run>`; the driver only sees one small row per bucket. Up to
    `rows_per_bucket` ids make one bucket, written directly (bounded by that size).
    """
    if not parts:
        return EMPTY_INDEX
    total = sum(part_rows(output.fs, parts))
    if total == 0:
        return EMPTY_INDEX
    buckets = max(1, -(-total // rows_per_bucket))
    output.fs.delete_dir_contents(output.path(INDEX_DIR, name), missing_dir_ok=True)
    directory = output.path(INDEX_DIR, name, uuid.uuid4().hex[:12])
    output.fs.create_dir(directory, recursive=True)
    fs_uri = output.uri if not is_local(output.uri) else "/"
    if buckets == 1:  # at most rows_per_bucket ids: one bucket, written here without a shuffle
        tables = []
        for path in parts:
            with output.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f, columns=[column]).rename_columns(["id"]))
        ids = pa.concat_tables(tables).column("id").combine_chunks()
        _write_bucket(pa.table({"id": ids, "bucket": pa.array(np.zeros(len(ids), np.int64))}),
                      fs_uri, directory)
        return DoneIndex(directory=_index_uri(output, directory), buckets=1)
    import ray

    ds = ray.data.read_parquet(list(parts), filesystem=output.fs, columns=[column])
    ds = ds.map_batches(_bucket_ids, fn_kwargs={"column": column, "buckets": buckets},
                        batch_format="pyarrow")
    ds = ds.groupby("bucket").map_groups(_write_bucket, batch_format="pyarrow",
                                         fn_kwargs={"fs_uri": fs_uri, "directory": directory})
    ds.materialize()
    return DoneIndex(directory=_index_uri(output, directory), buckets=buckets)


def _index_uri(output: Output, directory: str) -> str:
    if is_local(output.uri):
        return directory
    return f"{output.uri.split('://', 1)[0]}://{directory}"


# ---------------------------------------------------------------------------------------------
# Work listings: chunk files of listed inputs, handed to tasks a slice at a time
# ---------------------------------------------------------------------------------------------

LISTING_ROW_GROUP = 1024  # rows per row group of a listing chunk: a task reads one group or two
# Ray Data tasks over a listing, each working through a run of consecutive units: about
# TASKS_PER_CPU per cluster CPU (each task start costs ~0.25 s of a worker's time, a unit of small
# crops ~0.4 s), more when that makes runs longer than MAX_UNITS_PER_TASK (a new node joining an
# autoscaling cluster finds work), never more than MAX_LISTING_BLOCKS (the driver holds the tasks)
TASKS_PER_CPU = 4
MAX_UNITS_PER_TASK = 16
MAX_LISTING_BLOCKS = 10_000


def task_count(units: int, cluster_cpus: float, max_tasks: int = MAX_LISTING_BLOCKS) -> int:
    """Tasks to spread `units` cheap units of work over (each task doing a run of consecutive
    units): about TASKS_PER_CPU per cluster CPU, more when runs would pass MAX_UNITS_PER_TASK,
    at most one per unit and at most `max_tasks`."""
    wanted = max(TASKS_PER_CPU * max(1, int(cluster_cpus)), -(-units // MAX_UNITS_PER_TASK))
    return max(1, min(units, wanted, max_tasks))


@dataclass(frozen=True)
class ListingUnits:
    """The rows of listing chunks (Parquet files on `fs`, `rows[i]` rows in `chunks[i]`) cut into
    units of `per_unit` consecutive rows of one chunk, numbered 0 .. count-1.

    The units are spread over `runs(cluster_cpus)` runs of consecutive units; `dataset(runs)` is
    a Ray Dataset of the run numbers (column "id"), made inside Ray Data from one integer range:
    the driver holds the chunk paths and their row counts, never a row per unit, and no Ray task
    lists or reads the chunks up front (Ray Data's Parquet read would run a listing task and a
    footer reader before the first unit, and its repartition task would keep a CPU busy while it
    passes every row on). A task takes its run's units (`units_of_run`) and reads their rows with
    `iter_rows(units)`, each row group once.
    """
    fs: pafs.FileSystem
    chunks: Sequence[str]
    rows: Sequence[int]
    per_unit: int

    @functools.cached_property
    def ends(self) -> List[int]:
        """Unit number one past the last unit of each chunk."""
        ends, total = [], 0
        for n in self.rows:
            total += -(-n // self.per_unit)
            ends.append(total)
        return ends

    @property
    def count(self) -> int:
        return self.ends[-1] if self.ends else 0

    def runs(self, cluster_cpus: float) -> int:
        """Runs of consecutive units to spread over the cluster, one task each (`task_count`)."""
        return task_count(self.count, cluster_cpus)

    @staticmethod
    def dataset(runs: int):
        """Run numbers 0 .. runs-1 as a Ray Dataset of one block each: a map with no batch size
        fuses with their read, so each run is one task."""
        import ray

        return ray.data.range(runs, override_num_blocks=runs)

    def rows_dataset(self, cluster_cpus: float):
        """Every row, as a Ray Dataset: `runs(cluster_cpus)` tasks, each reading its run's units
        (a block per unit). What it is mapped with (no batch size) runs in the same tasks. Unlike
        `ray.data.read_parquet`, no listing or footer task comes first (1.5-4 s of a small job
        on 2 CPUs)."""
        runs = self.runs(cluster_cpus)
        return self.dataset(runs).map_batches(rows_of_runs, fn_kwargs={"listing": self, "runs": runs},
                                              batch_size=None, batch_format="pyarrow")

    def units_of_run(self, run: int, runs: int) -> range:
        """The units of run `run` of `runs` (runs differ in length by one unit at most)."""
        return range(run * self.count // runs, (run + 1) * self.count // runs)

    def locate(self, unit: int) -> tuple:
        """(chunk index, first row, row after the last) of `unit`."""
        if not 0 <= unit < self.count:
            raise IndexError(f"listing unit {unit} is not in 0..{self.count - 1}")
        chunk = int(np.searchsorted(self.ends, unit, side="right"))
        first = (unit - (self.ends[chunk - 1] if chunk else 0)) * self.per_unit
        return chunk, first, min(first + self.per_unit, self.rows[chunk])

    def rows_of(self, unit: int) -> pa.Table:
        """The listing rows of `unit`."""
        return next(self.iter_rows([unit]))

    def iter_rows(self, units: Iterable[int]) -> Iterator[pa.Table]:
        """The listing rows of each of `units` in turn, read from the row groups of its chunk
        that hold them. Consecutive units of one chunk share the chunk's open file and footer,
        and a row group is read once for all the units it holds (only the groups of the current
        unit are kept)."""
        with contextlib.ExitStack() as stack:
            current, reader, starts, held = None, None, [], {}
            for unit in units:
                chunk, first, stop = self.locate(unit)
                if chunk != current:
                    stack.close()
                    reader = pq.ParquetFile(stack.enter_context(self.fs.open_input_file(self.chunks[chunk])))
                    sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
                    starts = list(np.cumsum([0] + sizes))
                    current, held = chunk, {}
                groups = [g for g in range(len(starts) - 1) if starts[g] < stop and starts[g + 1] > first]
                held = {g: held[g] if g in held else reader.read_row_group(g) for g in groups}
                table = pa.concat_tables([held[g] for g in groups])
                yield table.slice(first - starts[groups[0]], stop - first)


def rows_of_runs(batch: pa.Table, listing: ListingUnits, runs: int) -> Iterator[pa.Table]:
    """Batch of run numbers {id} -> the rows of each unit of those runs, unit by unit."""
    for run in batch.column("id").to_pylist():
        yield from listing.iter_rows(listing.units_of_run(run, runs))


def write_listing_chunks(fs: pafs.FileSystem, directory: str, rows: Iterable[Dict[str, Any]],
                         schema: pa.Schema, chunk_rows: int, row_group: int = LISTING_ROW_GROUP) -> tuple:
    """Stream listing `rows` into `directory/listing-NNNNN.parquet` files of `chunk_rows` rows
    (the last one fewer), row groups of `row_group` rows. Returns (chunk paths, their row
    counts). The listing is never held whole."""
    paths, counts, chunk = [], [], []

    def flush():
        path = f"{directory.rstrip('/')}/listing-{len(paths):05d}{PARQUET_SUFFIX}"
        write_parquet_atomic(fs, path, pa.Table.from_pylist(chunk, schema=schema), row_group)
        paths.append(path)
        counts.append(len(chunk))
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            flush()
    if chunk:
        flush()
    return paths, counts


# ---------------------------------------------------------------------------------------------
# Output names proven inside the output
# ---------------------------------------------------------------------------------------------

def path_inside(fs: pafs.FileSystem, root: str, *names: str) -> str:
    """`root/name/...` (a path on `fs`), proven inside `root`.

    Each name must be one plain path component (not empty, no `/` or `\\`, not `.` or `..`);
    on a local filesystem the resolved path (symbolic links followed) must lie under `root`'s
    resolved path too. Raises OutputError naming the path otherwise.
    """
    root = root.rstrip("/") or "/"
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise OutputError(f"output name {name!r} is not a plain file name inside {root}")
    path = "/".join([root.rstrip("/"), *names])
    if isinstance(fs, pafs.LocalFileSystem):
        real_root = os.path.realpath(root)
        if not os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep):
            raise OutputError(f"output path {path} resolves outside {root} (a symbolic link?)")
    return path
