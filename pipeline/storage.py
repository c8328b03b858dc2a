"""One place for storage URIs: local paths, `file://`, `s3://`, `gs://` through `pyarrow.fs`.

Every stage and job resolves paths here, so a URI means the same thing everywhere.
"""
from __future__ import annotations

import functools
import os
import posixpath
from typing import Tuple

import pyarrow.fs as pafs


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
