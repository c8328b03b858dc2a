"""One place for storage URIs: local paths, `file://`, `s3://`, `gs://` through `pyarrow.fs`.

Every stage and job resolves paths here, so a URI means the same thing everywhere. `s3://` is
configured the way the AWS SDKs are (AWS_ENDPOINT_URL for an S3-compatible server, AWS_* keys,
profiles, instance roles), for pyarrow and for the conditional writes below alike.

Object stores have no rename and no exclusive create. What S3 offers instead are conditional
writes: a PutObject with `If-None-Match: *` creates an object only when none is there, one with
`If-Match: <etag>` replaces it only when it is still the version read (`create_if_absent`,
`replace_if_version`, `delete_if_version`). pyarrow's S3FileSystem does not expose them, so these
go through boto3. Other stores (gs://, ...) get None from `versioned_store` and their callers
fall back to what they did without (see `pipeline.lease.Lease`).
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
    """True for a local path or a `file://` URI: a path the OS opens (after `resolve_fs`)."""
    return "://" not in uri or uri.startswith("file://")


def join_uri(root: str, *parts: str) -> str:
    """`root` joined with `parts`, keeping `root`'s kind (URI or local path)."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    """Write `text` to the file `uri`, creating its folder."""
    fs, path = resolve_fs(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory between a local path and a URI (either way)."""
    src_fs, src_path = resolve_fs(src)
    dst_fs, dst_path = resolve_fs(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def local_copy(uri: str, prefix: str = "flowsr-") -> str:
    """A local path of the file `uri`: itself when local (`file://` included), else a fresh
    download into a new temporary folder (unlike `cached_copy`, for files that change)."""
    if is_local(uri):
        return resolve_fs(uri)[1]
    fs, path = resolve_fs(uri)
    local = os.path.join(tempfile.mkdtemp(prefix=prefix), posixpath.basename(path))
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


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


# ---------------------------------------------------------------------------------------------
# Conditional writes (S3): create-if-absent and compare-and-swap on one object
# ---------------------------------------------------------------------------------------------

class VersionedS3:
    """Conditional writes on the objects of one S3 filesystem; a version is an object's ETag.

    Each call is one request: S3 applies the condition and the write atomically, so of two
    writers with the same condition exactly one succeeds (the other gets 412 Precondition
    Failed, or 409 ConditionalRequestConflict while the first is in flight)."""

    LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")

    def __init__(self, region: Optional[str]):
        import boto3  # configured from the environment, as pyarrow's S3 client is
        from botocore.exceptions import ClientError

        self.client = boto3.session.Session().client("s3", region_name=region or None)
        self.ClientError = ClientError

    @staticmethod
    def _split(path: str) -> Tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    @staticmethod
    def _code(err) -> str:
        return err.response.get("Error", {}).get("Code", "")

    def _lost(self, err) -> bool:
        return self._code(err) in self.LOST

    def create_if_absent(self, path: str, data: bytes) -> Optional[str]:
        """Write `data` at `path` when nothing is there; its version, or None when something was."""
        bucket, key = self._split(path)
        try:
            return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except self.ClientError as err:
            if self._lost(err):
                return None
            raise

    def read(self, path: str) -> Optional[Tuple[bytes, str]]:
        """(bytes, version) of the object at `path` (one GET: the two belong together), or None."""
        bucket, key = self._split(path)
        try:
            got = self.client.get_object(Bucket=bucket, Key=key)
        except self.ClientError as err:
            if self._code(err) in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def replace_if_version(self, path: str, data: bytes, version: str) -> Optional[str]:
        """Replace the object at `path` when it is still `version`; the new version, or None."""
        bucket, key = self._split(path)
        try:
            return self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except self.ClientError as err:
            if self._lost(err):
                return None
            raise

    def delete_if_version(self, path: str, version: str) -> bool:
        """Delete the object at `path` when it is still `version`; True when it was deleted."""
        bucket, key = self._split(path)
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
            return True
        except self.ClientError as err:
            if self._lost(err):
                return False
            if self._code(err) not in ("NotImplemented", "InvalidArgument", "501"):
                raise
        # a store without conditional deletes: check the version, then delete (not one step)
        found = self.read(path)
        if found is None or found[1] != version:
            return False
        self.client.delete_object(Bucket=bucket, Key=key)
        return True


def versioned_store(fs: pafs.FileSystem) -> Optional[VersionedS3]:
    """Conditional writes for `fs`'s objects, or None where the store (or pyarrow) offers none:
    only S3 (and S3-compatible servers that honour If-None-Match / If-Match) has them here."""
    if fs.type_name != "s3":
        return None
    return _versioned_s3(getattr(fs, "region", None))


@functools.lru_cache(maxsize=8)
def _versioned_s3(region: Optional[str]) -> VersionedS3:
    return VersionedS3(region)
