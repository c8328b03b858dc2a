"""One place for storage URIs: local paths, `file://`, `s3://`, `gs://` through `pyarrow.fs`.

Every stage and job resolves paths here, so a URI means the same thing everywhere.
"""
from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
from typing import Optional, Tuple

import pyarrow.fs as pafs


COPY_CHUNK = 8 << 20  # bytes per read when downloading a file


@functools.lru_cache(maxsize=32)
def _filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def resolve_fs(uri: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a pyarrow URI (s3://, gs://, file://); the remote
    filesystems are cached per bucket."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join_uri(root: str, *parts: str) -> str:
    """`root` joined with `parts`, keeping `root`'s kind (URI or local path)."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


CACHE_ENV = "FLOWSR_CACHE"  # where remote inputs are copied (default ~/.cache/flowsr/remote)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "flowsr", "remote")


def cached_copy(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local path for the file or directory `uri` (a checkpoint, a base model folder, ...).

    Local paths and `file://` come back as local paths, untouched. Other URIs (`s3://`, `gs://`,
    ...) are downloaded once into `cache_dir` (default $FLOWSR_CACHE, else ~/.cache/flowsr/remote)
    under a name derived from the URI, and reused by every later call on that machine: an actor
    pays the download in its constructor, the next actors of the node find it done. The copy is
    written under a temporary name and renamed, so concurrent callers never see half a copy.
    A URI is assumed immutable (as Ray Train's checkpoint directories are)."""
    if is_local(uri):
        return resolve_fs(uri)[1]
    fs, path = resolve_fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    root = cache_dir or cache_root()
    name = posixpath.basename(path.rstrip("/")) or "root"
    local = os.path.join(root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16], name)
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(local))
    try:
        target = os.path.join(tmp, name)
        if info.type == pafs.FileType.Directory:
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            with fs.open_input_stream(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
        try:
            os.rename(target, local)
        except OSError:  # another process finished first: keep its copy
            if not os.path.exists(local):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local
