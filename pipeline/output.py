"""One resumable-output layer for every job that writes results under an output folder or URI.

What a job gets from `open_output(...)`:

* **a lease** (`_lease.json`, `pipeline.lease.Lease`): one writer per output; a second run
  refuses with one line, a lease left by a killed run is taken over.
* **a run record** (`_run.json`): what produced the results — the job, its input, the
  parameters that change results, the checkpoint digest and the code version
  (`pipeline.fingerprint`). It is written on the first run and compared on every rerun; a
  difference in the job, the parameters or the checkpoint is refused with one line naming the
  fields (`--overwrite` or a new output to proceed). The input and the code version are
  recorded, not compared: identities come from content, so a moved input resumes, and a code
  change that changes results bumps a parameter version (e.g. the degradation's `PARAMS_VERSION`).
* **atomic commits**: every file is written under a dot-prefixed temporary name in its final
  directory (pyarrow and Ray readers skip dot-files) and renamed when complete; temporary
  files of killed runs are removed once the lease is held.
* **resume state read from committed parts** (`pipeline.done_index.DoneIndex`): never a
  per-item list held in the driver.

All storage goes through `pyarrow.fs` (`pipeline.storage.resolve_fs`): local paths, file://,
s3://, gs://. On an object store a "rename" is a server-side copy and a delete: the final object
still appears whole or not at all (a killed run leaves at most a temporary object, removed by
the next run), but each part is written twice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import join_uri, resolve_fs, versioned_store

TMP_PREFIX = ".tmp-"
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
RUN_FILE = "_run.json"
LEASE_FILE = "_lease.json"
LEASE_TTL_S = 120.0  # a lease whose heartbeat is older than this is stale
ROW_GROUP_ROWS = 64
COMPARED_FIELDS = ("job", "params", "checkpoint")


class OutputError(ValueError):
    """A user mistake about an output folder; the message is one line meant for stderr."""


class RunMismatch(OutputError):
    """The output holds results of a run with other settings."""


class OutputBusy(OutputError):
    """Another live run holds the output's lease."""


# ---------------------------------------------------------------------------------------------
# Atomic writes and committed parts
# ---------------------------------------------------------------------------------------------

def parent_dir(path: str) -> str:
    """The folder part of a path on a pyarrow filesystem ("." for a bare name)."""
    return path.rsplit("/", 1)[0] if "/" in path else "."


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` through `.tmp-<uuid>-<name>` in the same directory, then rename it."""
    directory, name = parent_dir(path), path.rsplit("/", 1)[-1]
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
        directory, name = parent_dir(path), path.rsplit("/", 1)[-1]
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
# Run record
# ---------------------------------------------------------------------------------------------

def run_record(job: str, input: Any, params: Dict[str, Any], checkpoint: Optional[str] = None
               ) -> Dict[str, Any]:
    """What produced an output's results (written as `_run.json`)."""
    from pipeline.fingerprint import code_version  # fingerprint.py raises this module's OutputError

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
    from pipeline.lease import Lease  # lease.py writes through this module's atomic writes

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
