"""File names that are not valid UTF-8, carried losslessly through Parquet and JSON.

A POSIX file name is bytes; Python lists a name that is not valid UTF-8 (`caf\\xe9.png` from an
old Samba share) as a str with surrogate escapes (PEP 383), which Arrow's UTF-8 string columns
refuse. Such a local path is written as a `file://` URI of its percent-encoded bytes (RFC 8089:
`file:///photos/caf%E9.png`) and read back to the same str before the file is opened; every
other path is kept as it is. The encoding is unambiguous: a `file://` URI is decoded only when
its percent-decoded bytes are not UTF-8, which only such a name gives. pyarrow's filesystems
cannot open such a path either (they take UTF-8), so `resolve` opens it through `OsNames`. An object store's keys
are UTF-8 by definition, so a name that is not cannot be written there (`UnencodableName`).
"""
from __future__ import annotations

import os
import shutil
import stat
import urllib.parse

import pyarrow.fs as pafs

FILE_SCHEME = "file://"


class UnencodableName(ValueError):
    """A file name that is not valid UTF-8 where only UTF-8 names exist (an object store key)."""


def is_utf8(path: str) -> bool:
    """True when `path` has no surrogate escapes (its bytes were valid UTF-8)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_text(path: str) -> str:
    """`path` as valid UTF-8 text: unchanged when it is, else a `file://` URI of its bytes
    (absolute). Raises UnencodableName for a URI of another scheme (s3://, gs://, ...)."""
    if is_utf8(path):
        return path
    if "://" in path and not path.startswith(FILE_SCHEME):
        raise UnencodableName(f"{escaped(path)} is not valid UTF-8, which names at "
                              f"{path.split('://', 1)[0]}:// must be")
    local = path[len(FILE_SCHEME):] if path.startswith(FILE_SCHEME) else os.path.abspath(path)
    return FILE_SCHEME + urllib.parse.quote(os.fsencode(local), safe="/")


def from_text(text: str) -> str:
    """The path `to_text` encoded (a str with surrogate escapes, as `os.listdir` gives it);
    any other text unchanged."""
    if not text.startswith(FILE_SCHEME) or "%" not in text:
        return text
    raw = urllib.parse.unquote_to_bytes(text[len(FILE_SCHEME):])
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)
    return text


def escaped(path: str) -> str:
    """`path` for a message: bytes that are not UTF-8 shown as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def resolve(uri: str):
    """(filesystem, path) for a path or URI as the job's tables hold it: a name that `to_text`
    encoded is opened with Python's own file functions (`OsNames`), anything else through
    `pipeline.storage.resolve_fs`."""
    from pipeline.storage import resolve_fs

    path = from_text(uri)
    if is_utf8(path):
        return resolve_fs(uri)
    return OsNames(), os.path.abspath(path)


class OsNames:
    """The part of `pyarrow.fs.FileSystem` the upscale job's file stages use, on the local
    filesystem through Python's `os` and `open`, which take any file name (str with surrogate
    escapes)."""

    def get_file_info(self, path: str) -> pafs.FileInfo:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return pafs.FileInfo(to_text(path), pafs.FileType.NotFound)
        kind = (pafs.FileType.File if stat.S_ISREG(st.st_mode) else
                pafs.FileType.Directory if stat.S_ISDIR(st.st_mode) else pafs.FileType.Unknown)
        return pafs.FileInfo(to_text(path), kind, size=st.st_size)

    def open_input_stream(self, path: str):
        return open(path, "rb")

    open_input_file = open_input_stream

    def open_output_stream(self, path: str):
        return open(path, "wb")

    def create_dir(self, path: str, recursive: bool = True) -> None:
        os.makedirs(path, exist_ok=True) if recursive else os.mkdir(path)

    def move(self, src: str, dest: str) -> None:
        os.replace(src, dest)

    def delete_file(self, path: str) -> None:
        os.remove(path)

    def delete_dir(self, path: str) -> None:
        shutil.rmtree(path)
