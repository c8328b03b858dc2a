"""Content identities and versions recorded in an output's run record.

`bytes_digest` names a file by its bytes, `checkpoint_digest` a checkpoint file or folder by its
files' names, sizes and bytes, `code_version` the installed package and git commit.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
from typing import Optional

import pyarrow.fs as pafs

from pipeline.output import OutputError
from pipeline.storage import resolve_fs


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
