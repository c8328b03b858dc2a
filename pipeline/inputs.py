"""The one input layer: which files are images, how a source is listed, how an input is read.

A source is a folder (walked recursively), a glob (`**` crosses folders), one file, or a Parquet
file whose `path_column` lists the inputs; local paths and object-store URIs alike. Listing is
loop-safe and streamed (`list_input_groups`: one folder, or LISTING_GROUP_ROWS rows of a list, at
a time, never the whole corpus), and every listed file comes back as an `Input` row: `pending`
when it is to be read, `unsupported` when its extension is not an image's (IMAGE_EXTENSIONS),
`error` when it cannot be read (a named pipe, a device, a dangling link).

Reading is safe before any decode: `check_input` reads only regular files up to a size cap, and
`check_pixels` caps an input's (and its output's) pixels from the header's size.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import pyarrow.fs as pafs

from pipeline import names

# what pipeline.images.load_image decodes; every job that lists images takes this set
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
GLOB_CHARS = "*?["
MAX_PIXELS = 150_000_000  # input pixels, from the header: a 100-MP photo passes; decoding costs ~3-8 B/pixel
MAX_OUTPUT_PIXELS = 400_000_000  # output pixels: the result is one uint8/uint16 buffer of this size
MAX_BYTES = 1 << 30  # input file size

# status of a row: pending (to do), ok (written now), skipped (valid output existed), error,
# unsupported (a listed file that is not an image by its extension; not a failure)
PENDING, OK, SKIPPED, ERROR, UNSUPPORTED = "pending", "ok", "skipped", "error", "unsupported"


# ---- paths and filesystems ----------------------------------------------------------------------
split_uri = names.resolve  # `resolve_fs`, and file names that are not UTF-8 (`pipeline.names`)


def _with_scheme(root: str, path: str) -> str:
    """`path` from a listing of `root`'s filesystem as a URI of the same kind as `root`."""
    return f"{root.split('://', 1)[0]}://{path}" if "://" in root and not root.startswith("file://") else path


class Input(NamedTuple):
    """One listed input: its URI, its name relative to the input root (which the output name
    mirrors), and a status other than `pending` (with the reason) when it is not to be processed."""

    uri: str
    relative: str
    status: str = PENDING
    error: str = ""


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str:
    """Why a file of st_mode `mode` is not read ("" for a regular file)."""
    if stat.S_ISREG(mode):
        return ""
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return f"not a regular file ({kind})" if kind != "not a regular file" else kind


LISTING_GROUP_ROWS = 10_000  # Parquet-list inputs per yielded group (a list has no folders to group by)


def _walk_local(root: str, exclude: Sequence[str] = ()) -> Iterator[List[Tuple[str, str]]]:
    """(path, problem) of the files under local directory `root`, one folder at a time (each
    group sorted); problem is "" for a regular file, else why it is not read. Sibling folders
    whose names differ only in case are one group (their outputs can collide on a
    case-insensitive filesystem). Symbolic links to directories are followed, each real
    directory is walked once (the real tree first, then linked ones in the order met), so link
    loops (`sub/up -> ..`, `self -> .`) end and nothing is listed twice. Folders in `exclude`
    (the output, when it lies inside the input) are not entered. Holds one folder's entries and
    one (device, inode) per folder, never the whole listing."""
    seen = set()
    deferred: List[str] = []  # symbolic links to directories, walked after the real tree

    def key(st):
        return st.st_dev, st.st_ino

    for path in exclude:
        try:
            seen.add(key(os.stat(path)))
        except OSError:
            pass

    def walk(start: str) -> Iterator[List[Tuple[str, str]]]:
        stack = [(start,)]
        while stack:
            found, subdirs = [], []
            for directory in stack.pop():
                try:
                    entries = sorted(os.scandir(directory), key=lambda e: e.name)
                except OSError as err:
                    found.append((directory, f"cannot list the directory: {err.strerror or err}"))
                    continue
                for entry in entries:
                    try:
                        if entry.is_symlink():
                            st = os.stat(entry.path)  # follows the link
                            if stat.S_ISDIR(st.st_mode):
                                deferred.append(entry.path)
                                continue
                        else:
                            st = entry.stat(follow_symlinks=False)
                            if stat.S_ISDIR(st.st_mode):
                                if key(st) not in seen:
                                    seen.add(key(st))
                                    subdirs.append(entry.path)
                                continue
                    except OSError as err:  # a dangling link, a vanished file
                        found.append((entry.path, f"cannot stat: {err.strerror or err}"))
                        continue
                    found.append((entry.path, _not_regular(st.st_mode)))
            if found:
                yield sorted(found)
            stack.extend(reversed(_case_groups(subdirs)))

    if key(os.stat(root)) in seen:
        return
    seen.add(key(os.stat(root)))
    yield from walk(root)
    while deferred:
        link = deferred.pop(0)
        try:
            st = os.stat(link)
        except OSError:
            continue
        if key(st) not in seen:
            seen.add(key(st))
            yield from walk(link)


def _case_groups(directories: Sequence[str]) -> List[Tuple[str, ...]]:
    """`directories` grouped by their name ignoring case, groups in sorted order."""
    groups: Dict[str, List[str]] = {}
    for path in directories:
        groups.setdefault(posixpath.basename(path.rstrip("/")).casefold(), []).append(path)
    return [tuple(sorted(groups[name])) for name in sorted(groups)]


def _walk_remote(fs: pafs.FileSystem, root: str, exclude: Sequence[str] = ()) -> Iterator[List[Tuple[str, str]]]:
    """`_walk_local` for object stores and other filesystems (no links): one listing call per
    folder, so the driver holds one folder's entries at a time. Folders in `exclude` (URIs: the
    output, when it lies inside the input) are not entered."""
    skip = {split_uri(uri)[1].rstrip("/") for uri in exclude if "://" in uri and not uri.startswith("file://")}
    stack = [(root,)]
    while stack:
        found, subdirs = [], []
        for directory in stack.pop():
            for info in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
                if info.type == pafs.FileType.Directory and info.path.rstrip("/") not in skip:
                    subdirs.append(info.path)
                elif info.type == pafs.FileType.File:
                    found.append((info.path, ""))
        if found:
            yield sorted(found)
        stack.extend(reversed(_case_groups(subdirs)))


def _walk(fs: pafs.FileSystem, root: str, exclude: Sequence[str] = ()) -> Iterator[List[Tuple[str, str]]]:
    """(path, problem) of the files under `root`, a folder at a time (`_walk_local`)."""
    if isinstance(fs, (pafs.LocalFileSystem, names.OsNames)):
        return _walk_local(root, exclude)
    return _walk_remote(fs, root, exclude)


def is_image(path: str) -> bool:
    """Is `path` an image by its extension (IMAGE_EXTENSIONS, any case)?"""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path


def _listed(uri: str, relative: str, problem: str, *, by_extension: bool) -> Input:
    """An Input for a listed file: an error row when it cannot be read, an `unsupported` row when
    `by_extension` and its extension is not an image's."""
    if problem:
        return Input(uri, relative, ERROR, f"list: {problem}")
    if by_extension and not is_image(uri):
        ext = os.path.splitext(uri)[1] or "no extension"
        return Input(uri, relative, UNSUPPORTED, f"unsupported file type ({ext}); supported: {' '.join(IMAGE_EXTENSIONS)}")
    return Input(uri, relative)


class Listing(NamedTuple):
    """The inputs of a source as a stream of groups of `Input`s. `by_folder`: each group holds
    every input whose output name can collide with another's (one folder, `plan_key`), so names
    can be planned group by group; otherwise (a Parquet list, in any order) planning needs the
    inputs grouped by `plan_key` first."""

    groups: Iterator[List[Input]]
    by_folder: bool


def list_input_groups(source: str, *, path_column: str = "path", glob: Optional[bool] = None,
                      exclude: Sequence[str] = ()) -> Listing:
    """The inputs of `source`, streamed (see `scan_inputs` for what is listed). A missing input,
    a glob without its root folder or a Parquet list without `path_column` raise here, before
    anything is read (FileNotFoundError, KeyError); the listing itself is lazy and holds one
    folder (or LISTING_GROUP_ROWS rows of a list) at a time. Folders in `exclude` are not walked."""
    fs, path = split_uri(source)
    info = fs.get_file_info(path)
    exists = info.type != pafs.FileType.NotFound
    if glob or (glob is None and not exists and any(ch in path for ch in GLOB_CHARS)):
        return Listing(_glob_groups(source, fs, path, exclude), True)
    if not exists:
        raise FileNotFoundError(f"no input at {source}")
    if source.endswith(".parquet") and info.type == pafs.FileType.File:
        return Listing(_parquet_groups(source, path_column), False)
    if isinstance(fs, (pafs.LocalFileSystem, names.OsNames)):
        mode = os.stat(path).st_mode
        if not stat.S_ISDIR(mode):
            one = Input(source, posixpath.basename(path), *((ERROR, f"list: {_not_regular(mode)}")
                                                            if _not_regular(mode) else ()))
            return Listing(iter([[one]]), True)
    elif info.type == pafs.FileType.File:
        return Listing(iter([[Input(source, posixpath.basename(path))]]), True)
    groups = ([_listed(_with_scheme(source, p), _relative(p, path), problem, by_extension=True)
               for p, problem in group] for group in _walk(fs, path, exclude))
    return Listing(groups, True)


def scan_inputs(source: str, *, path_column: str = "path", glob: Optional[bool] = None) -> List[Input]:
    """Every input of `source`, sorted, as `Input` rows: a directory (every file under it,
    recursively; image extensions are read, other files are `unsupported` rows), a glob (`**`
    crosses directories), one file, or a Parquet file with a `path_column` column (names relative
    to the deepest common directory; each path once). A path that exists is taken literally
    (`photos[2024]/`); it is read as a glob only when it does not exist, or when `glob` is True.
    Files that are not regular files (pipes, devices) are error rows. The whole listing in a
    list: for a corpus, stream it with `list_input_groups`."""
    listing = list_input_groups(source, path_column=path_column, glob=glob)
    unique = {i.uri: i for group in listing.groups for i in group}
    return sorted(unique.values(), key=lambda i: i.uri)


def _glob_groups(source: str, fs: pafs.FileSystem, path: str, exclude: Sequence[str] = ()
                 ) -> Iterator[List[Input]]:
    """The files matching glob `path`, a folder at a time: its root is the longest leading run of
    components that have no glob characters or exist literally as a directory (checked here,
    before the stream starts)."""
    parts = path.split("/")
    i = 1 if parts[0] == "" else 0  # an absolute path starts with ""
    root = "/".join(parts[:i])
    while i < len(parts) - 1:
        candidate = "/".join(parts[:i + 1]) or "/"
        if any(ch in parts[i] for ch in GLOB_CHARS) and fs.get_file_info(candidate).type != pafs.FileType.Directory:
            break
        root, i = candidate, i + 1
    pattern = "/".join(parts[i:])
    if fs.get_file_info(root or ".").type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no input at {source} (no folder {root or '.'})")

    def groups():
        for group in _walk(fs, root or ".", exclude):
            matched = [_listed(_with_scheme(source, p), _relative(p, root), problem, by_extension=True)
                       for p, problem in group if _glob_match_path(_relative(p, root), pattern)]
            if matched:
                yield matched
    return groups()


def list_inputs(source: str, *, path_column: str = "path", glob: Optional[bool] = None) -> List[Tuple[str, str]]:
    """(input URI, name relative to the input root) of the inputs of `source` that are to be read
    (`scan_inputs` without the rows it marks unsupported or unreadable)."""
    return [(i.uri, i.relative) for i in scan_inputs(source, path_column=path_column, glob=glob)
            if i.status == PENDING]


def _glob_match_path(relative: str, pattern: str) -> bool:
    """Does the file `relative` match glob `pattern`, itself or through a folder it lies in (a
    pattern that matches a folder takes everything under it, as a shell's expansion would)?"""
    parts = relative.split("/")
    return any(_glob_match("/".join(parts[:k]), pattern) for k in range(len(parts), 0, -1))


def _glob_match(relative: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    return pattern.startswith("**/") and _glob_match(relative, pattern[3:])


def _parquet_paths(source: str, path_column: str) -> Iterator[str]:
    """The non-empty entries of a Parquet list's `path_column`, streamed in record batches."""
    import pyarrow.parquet as pq

    fs, path = split_uri(source)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=[path_column], batch_size=LISTING_GROUP_ROWS):
            yield from (u for u in batch.column(0).to_pylist() if u)


def _parquet_root(source: str, path_column: str) -> Optional[str]:
    """The folder that a Parquet list's names are relative to: the deepest common directory of
    its (normalised) paths; when one listed path is that directory's own path (it is a prefix of
    all others, so it cannot be a file), its parent. One streamed pass, constant memory."""
    root, listed = None, False
    for uri in _parquet_paths(source, path_column):
        path = posixpath.normpath(uri.split("://", 1)[-1])
        if root is None:
            root, listed = path, True
            continue
        common = posixpath.commonpath([root, path])
        listed = path == common or (listed and common == root)
        root = common
    if root is None:
        return None
    return posixpath.dirname(root) if listed else root


def _parquet_groups(source: str, path_column: str) -> Iterator[List[Input]]:
    """The entries of a Parquet list as Inputs, LISTING_GROUP_ROWS at a time, in the list's order
    (names are taken after normalising the paths: `imgs/../src/x.jpg` -> `src/x.jpg`, so a name
    never climbs out of the common directory). The column is checked here; the root is found by
    a first streamed pass (`_parquet_root`) when the stream starts."""
    import pyarrow.parquet as pq

    fs, path = split_uri(source)
    with fs.open_input_file(path) as f:
        if path_column not in pq.ParquetFile(f).schema_arrow.names:
            raise KeyError(f"no column {path_column!r} in {source} (--path-column)")

    def groups():
        root = _parquet_root(source, path_column)
        group = []
        for uri in _parquet_paths(source, path_column):
            group.append(Input(uri, _relative(posixpath.normpath(uri.split("://", 1)[-1]), root)))
            if len(group) >= LISTING_GROUP_ROWS:
                yield group
                group = []
        if group:
            yield group
    return groups()


# ---- safe reads: checked before any decode ------------------------------------------------------
def read_bytes(uri: str) -> bytes:
    """The whole file at `uri` (check it first: `check_input`)."""
    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def check_input(uri: str, max_bytes: int = MAX_BYTES) -> None:
    """Raise ValueError unless `uri` is a regular file of at most `max_bytes` bytes (a named pipe
    would block a reader forever, a device would never end)."""
    fs, path = split_uri(uri)
    if isinstance(fs, (pafs.LocalFileSystem, names.OsNames)):
        st = os.stat(path)
        problem, size = _not_regular(st.st_mode), st.st_size
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no file at {uri}")
        problem, size = ("" if info.type == pafs.FileType.File else "not a regular file"), info.size
    if problem:
        raise ValueError(problem)
    if size > max_bytes:
        raise ValueError(f"{size} bytes is over the file size cap of {max_bytes} bytes (--max-bytes)")


def check_pixels(h: int, w: int, H: int, W: int, max_pixels: int = MAX_PIXELS,
                 max_output_pixels: int = MAX_OUTPUT_PIXELS) -> None:
    """Raise ValueError when an input of (h, w) or its output of (H, W) is over the pixel caps."""
    if h * w > max_pixels:
        raise ValueError(f"{w}x{h} = {h * w / 1e6:.1f} MP is over the input pixel cap of "
                         f"{max_pixels / 1e6:g} MP (--max-pixels)")
    if H * W > max_output_pixels:
        raise ValueError(f"the {W}x{H} output = {H * W / 1e6:.1f} MP is over the output pixel cap of "
                         f"{max_output_pixels / 1e6:g} MP (--max-output-pixels)")
