"""Files in, files out for bulk upscaling: listing, output names, probing, decoding, writing.

Each stage is a plain function over a batch dict (column -> sequence), callable on one image in
a test without Ray; `jobs/upscale.py` chains them with Ray Data. Rows carry images between stages
as raw bytes (`pixels`, `alpha`) plus shape and dtype columns, never as tensor columns.

Format rules: PNG, JPEG and WebP out (`same` keeps PNG / JPEG / WebP inputs' format, other
inputs become PNG); 16-bit in -> 16-bit out (PNG; JPEG and WebP are 8-bit formats); alpha is
upscaled separately (bicubic) and kept (a JPEG target for an image with alpha is written as PNG,
as Real-ESRGAN does); grayscale stays grayscale (except WebP, which has no gray mode); EXIF
orientation is applied on decode. Writes are atomic (temporary file in `TMP_DIR`, then a move).

Identity of an input is its content: each output records the sha256 of the input bytes it was
made from (EXIF ImageDescription, `SOURCE_DIGEST_PREFIX`), as does the manifest (`input_sha256`).
On a rerun an output counts as done when it exists, opens, has the expected size and records the
digest of the input as it is now; an input edited in place (same size or not) is redone. The
check needs no earlier manifest and no state in the driver: each probe reads its own input and
output.

Safety rules (`scan_inputs`, `plan_outputs`, `probe_batch`): only regular files are read, folder
links are followed once per real folder, a path that exists is never read as a glob, files that
are not images by extension are `unsupported` rows, sizes and pixel counts are capped before any
decode; every output resolves inside the output folder and no two inputs share one.

At corpus scale (`list_input_groups`, `write_listing`, `probe_and_commit`, `write_and_count`,
`consolidate_manifest`) nothing holds the whole listing: inputs stream a folder at a time into
Parquet chunks, and the manifest is committed as one part per finished batch (`PARTS_DIR`),
streamed into one file at the end.
"""
from __future__ import annotations

import errno
import fnmatch
import io
import os
import posixpath
import stat
import struct
import uuid
import zlib
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow.fs as pafs

from pipeline import names
from pipeline.storage import join_uri

from flowsr.tiling import output_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")  # what pipeline.images.load_image decodes
OUTPUT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
OUTPUT_FORMATS = ("same", "png", "jpg", "webp")
TMP_DIR = ".flowsr-tmp"  # under the output root; emptied at the start and end of every run
MANIFEST_NAME = "manifest.parquet"
PARTS_DIR = "_manifest-parts"  # under the output root: the manifest, committed batch by batch during a run
JPEG_QUALITY = 95
WEBP_QUALITY = 95
PNG_COMPRESSION = 3  # zlib level 0-9: 3 is close to 9 in size for photos and several times faster
EXIF_ORIENTATION = 0x0112
HEADER_BYTES = 1 << 20  # read to probe an input's header
GLOB_CHARS = "*?["
MAX_PIXELS = 150_000_000  # input pixels, from the header: a 100-MP photo passes; decoding costs ~3-8 B/pixel
MAX_OUTPUT_PIXELS = 400_000_000  # output pixels: the result is one uint8/uint16 buffer of this size
MAX_BYTES = 1 << 30  # input file size
PNG_TAIL_BYTES = 1 << 16  # read from a PNG's end to find an eXIf chunk that follows the image data
SOURCE_DIGEST_TAG = 0x010E  # EXIF ImageDescription of an output: SOURCE_DIGEST_PREFIX + its input's sha256
SOURCE_DIGEST_PREFIX = "flowsr source sha256:"
DIGEST_READ_BYTES = 1 << 22  # an input is hashed in reads of this size

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


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path


def _listed(uri: str, relative: str, problem: str, *, by_extension: bool) -> Input:
    """An Input for a listed file: an error row when it cannot be read, an `unsupported` row when
    `by_extension` and its extension is not an image's."""
    if problem:
        return Input(uri, relative, ERROR, f"list: {problem}")
    if by_extension and not _is_image(uri):
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
                       for p, problem in group if _glob_match(_relative(p, root), pattern)]
            if matched:
                yield matched
    return groups()


def list_inputs(source: str, *, path_column: str = "path", glob: Optional[bool] = None) -> List[Tuple[str, str]]:
    """(input URI, name relative to the input root) of the inputs of `source` that are to be read
    (`scan_inputs` without the rows it marks unsupported or unreadable)."""
    return [(i.uri, i.relative) for i in scan_inputs(source, path_column=path_column, glob=glob)
            if i.status == PENDING]


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


def output_name(relative: str, fmt: str, suffix: str = "") -> str:
    """The output name mirroring input name `relative`: same directories and stem (+ `suffix`),
    the extension of `fmt` (`same`: the input's, when it is PNG / JPEG / WebP, else PNG)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown format: {fmt!r} (choose from {', '.join(OUTPUT_FORMATS)})")
    stem, ext = os.path.splitext(relative)
    if fmt == "same":
        ext = ext.lower() if ext.lower() in (".png", ".jpg", ".jpeg", ".webp") else ".png"
    else:
        ext = OUTPUT_EXTENSIONS[fmt]
    return stem + suffix + ext


def _name_candidates(relative: str, fmt: str, suffix: str):
    """Output names for `relative` in order of preference (see `plan_outputs`)."""
    name = output_name(relative, fmt, suffix)
    ext = os.path.splitext(name)[1]
    yield name
    yield relative + suffix + ext
    k = 2
    while True:
        yield f"{relative}{suffix}-{k}{ext}"
        k += 1


def _jpeg_twin(name: str) -> Optional[str]:
    """The PNG name a JPEG target becomes when its image has alpha (see `probe_batch`)."""
    stem, ext = os.path.splitext(name)
    return stem + ".png" if ext.lower() in (".jpg", ".jpeg") else None


def _inside(output_root: str):
    """A test `name -> bool`: does OUT/name resolve (symbolic links included) inside OUT?"""
    if "://" in output_root and not output_root.startswith("file://"):
        root = posixpath.normpath(output_root.split("://", 1)[1])
        return lambda name: posixpath.normpath(posixpath.join(root, name)).startswith(root + "/")
    _, local = split_uri(output_root)
    real = os.path.realpath(local)
    return lambda name: os.path.realpath(os.path.join(local, name)).startswith(real.rstrip(os.sep) + os.sep)


RESERVED_DIRS = (TMP_DIR, PARTS_DIR)  # the job's own folders under the output root


def plan_key(relative: str) -> str:
    """Inputs with the same key may compete for an output name (`plan_outputs`): the folder of
    the (normalised) relative name, ignoring case."""
    return posixpath.dirname(posixpath.normpath(relative)).casefold()


def _inside_output(output_root: str):
    """A test `uri -> bool`: does the input lie inside the output folder (an earlier output)?"""
    inside = output_root.rstrip("/") + "/"
    if "://" not in output_root:
        inside = os.path.abspath(output_root) + os.sep
    return lambda uri: uri.startswith(inside)


def plan_outputs(inputs: Sequence, output_root: str, fmt: str, suffix: str = "") -> List[Dict[str, str]]:
    """Rows {input, output, status, error}, one per input (`Input`s or (uri, relative) pairs), in
    input order, each with its own output inside `output_root`. Inputs inside the output folder
    (earlier outputs, when OUT lies under IN) are left out.

    Naming rule (deterministic, never two inputs on one output): inputs whose extension is already
    the output's go first, then the others, each in sorted order of their relative name; each
    takes the first free name of: the mirrored name (`a.png`), the input name plus the output
    extension (`a.jpg.png`), then `a.jpg-2.png`, `a.jpg-3.png`, ... Names are compared ignoring
    case (case-insensitive filesystems), and a JPEG name also reserves its PNG twin (the target of
    an image with alpha). A name that would resolve outside OUT (`../x.png`, a symbolic link in
    OUT pointing elsewhere) or into the job's own folders makes the row an error. Names only
    compete within one folder (`plan_key`), so a corpus is planned folder by folder
    (`plan_group`) with the same result."""
    outside = _inside_output(output_root)
    items = [i for i in (Input(*i) for i in inputs) if not outside(i.uri)]
    groups: Dict[str, List[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault(plan_key(item.relative), []).append(k)
    rows: List[Dict[str, str]] = [{}] * len(items)
    contained = _inside(output_root)
    for members in groups.values():
        for k, row in zip(members, plan_group([items[k] for k in members], output_root, fmt, suffix, contained)):
            rows[k] = row
    return rows


def plan_group(items: Sequence[Input], output_root: str, fmt: str, suffix: str = "", contained=None
               ) -> List[Dict[str, str]]:
    """`plan_outputs` for inputs of one `plan_key` (the whole group: names are planned against
    each other); rows in the order of `items`. `contained`: `_inside(output_root)`, when the
    caller plans many groups."""
    contained = contained or _inside(output_root)
    rows = [{"input": i.uri, "output": "", "status": i.status, "error": i.error} for i in items]

    def rank(k):
        natural = output_name(items[k].relative, fmt, suffix)
        return (os.path.splitext(natural)[1].lower() != os.path.splitext(items[k].relative)[1].lower(),
                items[k].relative, k)
    taken = set()
    for k in sorted((k for k, i in enumerate(items) if i.status == PENDING), key=rank):
        relative = items[k].relative
        if posixpath.isabs(relative) or posixpath.normpath(relative).split("/")[0] == "..":
            rows[k].update(status=ERROR, error=f"plan: output name {relative!r} is outside the output folder")
            continue
        relative = posixpath.normpath(relative)
        if relative.split("/")[0].casefold() in RESERVED_DIRS:
            rows[k].update(status=ERROR, error=f"plan: output name {relative!r} is in a folder the job keeps "
                                               f"for itself ({', '.join(RESERVED_DIRS)})")
            continue
        for name in _name_candidates(relative, fmt, suffix):
            twin = _jpeg_twin(name)
            keys = {name.casefold(), *([twin.casefold()] if twin else [])}
            if not keys & taken:
                taken |= keys
                break
        if not contained(name):
            rows[k].update(status=ERROR, error=f"plan: output {name!r} resolves outside the output folder")
            continue
        rows[k]["output"] = join_uri(output_root, name)
    return rows


# ---- probing: header-only size and the resume check ---------------------------------------------
def _read_bytes(uri: str) -> bytes:
    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _header(uri: str):
    """A Pillow image opened lazily (header only) from the first HEADER_BYTES of `uri`, or from
    the whole file when the header is longer than that. A PNG's eXIf chunk that follows the image
    data is found from the file's tail (PNG_TAIL_BYTES) and put in `info`, as Pillow would after
    a full decode, so the EXIF orientation counts either way."""
    from pipeline.images import open_header  # the caps (`check_pixels`), not Pillow's bomb limit

    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        head = f.read(HEADER_BYTES)
        try:
            im = open_header(io.BytesIO(head))
        except Exception:  # noqa: BLE001 — a header past HEADER_BYTES, or not an image at all
            if len(head) < HEADER_BYTES:
                raise
            return open_header(io.BytesIO(head + f.read()))
    if im.format == "PNG" and "exif" not in im.info:
        exif = _png_chunk(head, b"eXIf") if len(head) < HEADER_BYTES else _png_tail_exif(fs, path)
        if exif:
            im.info["exif"] = exif
    return im


def _png_chunk(data: bytes, kind: bytes) -> Optional[bytes]:
    """The payload of the last complete, CRC-valid chunk `kind` found in `data` (a PNG or a piece
    of one), or None."""
    pos = data.rfind(kind)
    while pos >= 4:
        length = struct.unpack(">I", data[pos - 4:pos])[0]
        end = pos + 4 + length
        if end + 4 <= len(data) and zlib.crc32(data[pos:end]) == struct.unpack(">I", data[end:end + 4])[0]:
            return data[pos + 4:end]
        pos = data.rfind(kind, 0, pos)
    return None


def _png_tail_exif(fs: pafs.FileSystem, path: str) -> Optional[bytes]:
    """An eXIf chunk near the end of a PNG (after the image data, before IEND), or None."""
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as f:
        f.seek(max(0, size - PNG_TAIL_BYTES))
        return _png_chunk(f.read(), b"eXIf")


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


def header_size(f) -> Tuple[int, int, bool]:
    """(height, width, has_alpha) from an image header (a file or a lazily opened image), after
    EXIF orientation; no pixel decode."""
    from PIL import Image

    with (f if isinstance(f, Image.Image) else Image.open(f)) as im:
        w, h = im.size
        # PNG keeps EXIF before IDAT (in `info` after the header) or after it (put in `info` by
        # `_header`); getexif() on a PNG without it would decode the whole image
        has_exif = im.format != "PNG" or "exif" in im.info
        orientation = im.getexif().get(EXIF_ORIENTATION, 1) if has_exif else 1
        alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    return (w, h, alpha) if orientation in (5, 6, 7, 8) else (h, w, alpha)


def output_source(uri: str, size: Tuple[int, int]) -> Optional[str]:
    """The input digest (sha256 hex) that output `uri` records, "" when it records none, or None
    when it is not a valid output: missing, not an image whose structure checks out, or not
    (H, W) = `size`."""
    from PIL import Image

    fs, path = split_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with Image.open(io.BytesIO(_read_bytes(uri))) as im:
            if (im.size[1], im.size[0]) != tuple(size):
                return None
            exif = im.info.get("exif")  # read with the header; getexif() on a PNG could decode it all
            im.verify()
        if not exif:
            return ""
        recorded = _exif_value(exif, SOURCE_DIGEST_TAG)
        return recorded[len(SOURCE_DIGEST_PREFIX):] if recorded.startswith(SOURCE_DIGEST_PREFIX) else ""
    except Exception:  # noqa: BLE001 — any failure to read back means "not done"
        return None


def _exif_value(exif: bytes, tag: int) -> str:
    """Tag `tag` of an EXIF block (as Pillow keeps it in `info["exif"]`), as text ("" if absent)."""
    from PIL import Image

    block = Image.Exif()
    block.load(exif)
    value = block.get(tag, "")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def is_valid_output(uri: str, size: Tuple[int, int]) -> bool:
    """The output exists, its image structure checks out and it is (H, W) = `size`."""
    return output_source(uri, size) is not None


def file_digest(uri: str) -> str:
    """sha256 (hex) of the bytes of `uri`, read in pieces (`pipeline.fingerprint.bytes_digest` of the
    whole file)."""
    import hashlib

    fs, path = split_uri(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while piece := f.read(DIGEST_READ_BYTES):
            digest.update(piece)
    return digest.hexdigest()


def probe_batch(batch: Dict[str, Sequence], *, scale: float, resume: bool = True, max_pixels: int = MAX_PIXELS,
                max_output_pixels: int = MAX_OUTPUT_PIXELS, max_bytes: int = MAX_BYTES) -> Dict[str, list]:
    """Rows {input, output[, status, error]} -> + in/out sizes, status and `input_sha256`: rows
    planned as error or unsupported stay so; error when the input is not a regular file, is over a
    cap (`check_input`, `check_pixels`: from the file size and the header, before any decode) or
    its header does not parse; skipped when a valid output exists that records the digest of the
    input as it is now (and `resume`; the run record guarantees it was made with the same
    settings), with that digest; else pending (digest "": taken when the input is decoded). JPEG
    targets of images with alpha become PNG targets. An input is read whole only when it has a
    valid output."""
    out = {k: [] for k in ("input", "output", "in_height", "in_width", "out_height", "out_width",
                           "status", "error", "input_sha256")}
    planned = zip(batch.get("status") or [PENDING] * len(batch["input"]),
                  batch.get("error") or [""] * len(batch["input"]))
    for uri, target, (status, error) in zip(batch["input"], batch["output"], planned):
        h = w = H = W = 0
        status, error, digest = status or PENDING, error or "", ""
        if status != PENDING:
            pass
        else:
            try:
                check_input(uri, max_bytes)
                h, w, alpha = header_size(_header(uri))
                H, W = output_size(h, w, scale)
                check_pixels(h, w, H, W, max_pixels, max_output_pixels)
                if alpha and os.path.splitext(target)[1] in (".jpg", ".jpeg"):
                    target = os.path.splitext(target)[0] + ".png"
                recorded = output_source(target, (H, W)) if resume else None
                if recorded and recorded == file_digest(uri):
                    status, digest = SKIPPED, recorded
            except Exception as err:  # noqa: BLE001 — a bad file becomes an error row
                status, error = ERROR, f"probe: {type(err).__name__}: {err}"
        for k, v in zip(out, (uri, target, h, w, H, W, status, error, digest)):
            out[k].append(v)
    return out


# ---- decoding ---------------------------------------------------------------------------------
def split_channels(array: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A decoded HxW / HxWxC (C = 1..4) array -> (HxWx1 gray or HxWx3 RGB colour, HxW alpha or None)."""
    if array.ndim == 2:
        return array[..., None], None
    c = array.shape[2]
    if c in (1, 3):
        return array, None
    if c in (2, 4):
        return array[..., :c - 1], array[..., c - 1]
    raise ValueError(f"unsupported channel count {c}")


def decode_batch(batch: Dict[str, Sequence], *, max_pixels: int = MAX_PIXELS) -> Dict[str, list]:
    """Pending rows: read and decode (pipeline.images.load_image, under the `max_pixels` cap) into
    raw `pixels` (HxWxC, C = 1 or 3), `alpha` (HxW, or empty), `dtype`, `height`, `width`,
    `channels`, `icc` (the input's ICC profile, or empty), and `input_sha256`: the digest of the
    bytes decoded. Failures -> error rows."""
    from pipeline.images import load_image
    from pipeline.fingerprint import bytes_digest

    out = {k: list(v) for k, v in batch.items()}
    out.setdefault("input_sha256", [""] * len(out["input"]))
    cols = {k: [] for k in ("pixels", "alpha", "dtype", "height", "width", "channels", "icc")}
    for i, uri in enumerate(batch["input"]):
        values = (b"", b"", "", 0, 0, 0, b"")
        if out["status"][i] == PENDING:
            try:
                data = _read_bytes(uri)
                out["input_sha256"][i] = bytes_digest(data)
                decoded = load_image(data, uri, max_pixels)
                colour, alpha = split_channels(decoded.pixels)
                if colour.dtype not in (np.uint8, np.uint16):
                    raise ValueError(f"unsupported sample type {colour.dtype}")
                h, w, c = colour.shape
                out["in_height"][i], out["in_width"][i] = h, w  # as decoded (EXIF orientation applied)
                values = (colour.tobytes(), alpha.tobytes() if alpha is not None else b"", colour.dtype.name, h, w, c,
                          decoded.icc_profile or b"")
            except Exception as err:  # noqa: BLE001
                out["status"][i], out["error"][i] = ERROR, f"decode: {type(err).__name__}: {err}"
        for k, v in zip(cols, values):
            cols[k].append(v)
    return {**out, **cols}


def unpack(data: bytes, dtype: str, shape) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ---- the upscaling stage (a Ray actor, or a plain object) ---------------------------------------
class SimulatedCrash(RuntimeError):
    """Raised by the `fail_after` test switch: a worker dying in the middle of a run."""


class UpscaleStage:
    """The model's upscaler (`pipeline.sr_models.load_upscaler`: a FlowSR checkpoint or a spandrel
    weights file) over raw-bytes rows: pending rows get SR `pixels` and the new
    `height` / `width`, plus `seconds`. If a batch fails, its images are retried one by one and
    only the failing ones become error rows. `fail_after` >= 0 (a test switch) makes the call
    after that many upscaled images crash."""

    def __init__(self, checkpoint: str, *, fail_after: int = -1, **upscaler_options):
        from pipeline.sr_models import load_upscaler
        from pipeline.storage import cached_copy

        if upscaler_options.get("pretrained"):  # a base model folder at a URI: one copy per node
            upscaler_options["pretrained"] = cached_copy(upscaler_options["pretrained"])
        self.upscaler = load_upscaler(cached_copy(checkpoint), **upscaler_options)
        self.fail_after, self.upscaled = fail_after, 0

    def __call__(self, batch: Dict[str, Sequence]) -> Dict[str, list]:
        out = {k: list(v) for k, v in batch.items()}
        out["seconds"] = [0.0] * len(out["input"])
        todo = [i for i, s in enumerate(out["status"]) if s == PENDING]
        if 0 <= self.fail_after <= self.upscaled:
            raise SimulatedCrash(f"fail_after={self.fail_after}")
        self.upscaled += len(todo)
        images = [unpack(out["pixels"][i], out["dtype"][i], (out["height"][i], out["width"][i], out["channels"][i]))
                  for i in todo]
        try:
            results = [self.upscaler.upscale_images(images)]
            groups = [todo]
        except Exception:  # noqa: BLE001 — isolate the failing images
            results, groups = [], []
            for i, image in zip(todo, images):
                try:
                    results.append(self.upscaler.upscale_images([image]))
                    groups.append([i])
                except Exception as err:  # noqa: BLE001
                    out["status"][i], out["error"][i] = ERROR, f"upscale: {type(err).__name__}: {err}"
        for index, (srs, seconds) in zip(groups, results):
            for i, sr, sec in zip(index, srs, seconds):
                out["pixels"][i], out["height"][i], out["width"][i] = sr.tobytes(), sr.shape[0], sr.shape[1]
                out["seconds"][i] = sec
        return out


# ---- encoding and atomic writes -------------------------------------------------------------------
def resize_alpha(alpha: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an HxW uint8 / uint16 alpha channel to (H, W), same dtype."""
    import cv2

    peak = np.iinfo(alpha.dtype).max
    resized = cv2.resize(alpha.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.rint(resized), 0, peak).astype(alpha.dtype)


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) from HxWxC uint16."""
    import cv2

    c = array.shape[2]
    if c != 2:  # OpenCV writes 1, 3 and 4 channels (BGR order)
        order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[c]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(array[..., order]),
                               [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        if not ok:
            raise ValueError("PNG encoding failed")
        return buf.tobytes()
    h, w = array.shape[:2]  # gray + alpha: OpenCV cannot, so write the chunks directly (filter 0)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), array.astype(">u2").view(np.uint8).reshape(h, -1)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESSION)) + chunk(b"IEND", b""))


def _with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with a chunk of type `kind` holding `data` right after its IHDR chunk."""
    end_of_ihdr = 8 + 4 + 4 + 13 + 4  # signature, then length, type, 13 data bytes, CRC
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def _with_iccp(png: bytes, icc_profile: bytes) -> bytes:
    """`png` with an iCCP chunk (the ICC profile, zlib-compressed) right after its IHDR chunk."""
    return _with_chunk(png, b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile))


def source_exif(source_digest: str) -> bytes:
    """An EXIF block (as Pillow takes it: `Exif`, two NULs, TIFF) recording an output's input digest."""
    from PIL import Image

    block = Image.Exif()
    block[SOURCE_DIGEST_TAG] = SOURCE_DIGEST_PREFIX + source_digest
    return block.tobytes()


def encode_image(colour: np.ndarray, alpha: Optional[np.ndarray], ext: str,
                 icc_profile: Optional[bytes] = None, source_digest: str = "") -> bytes:
    """HxWxC (C = 1 or 3) uint8 / uint16 colour + optional HxW alpha -> file bytes of format `ext`.
    16 bits are kept in PNG; JPEG and WebP get 8 bits; JPEG drops alpha. `icc_profile` (the
    input's: the pixels are still in its colour space) is embedded in every format, and
    `source_digest` (the input's sha256, when given) as EXIF (`source_exif`)."""
    from PIL import Image

    exif = source_exif(source_digest) if source_digest else b""
    if ext == ".png" and colour.dtype == np.uint16:
        channels = [colour] if alpha is None else [colour, alpha[..., None]]
        png = _png16(np.concatenate(channels, axis=2))
        png = _with_chunk(png, b"eXIf", exif[len(b"Exif\x00\x00"):]) if exif else png
        return _with_iccp(png, icc_profile) if icc_profile else png
    if colour.dtype == np.uint16:
        colour = (colour.astype(np.uint32) * 255 + 32767) // 65535
        alpha = None if alpha is None else (alpha.astype(np.uint32) * 255 + 32767) // 65535
    colour = colour.astype(np.uint8)
    image = Image.fromarray(colour[..., 0] if colour.shape[2] == 1 else colour)
    if alpha is not None and ext != ".jpg" and ext != ".jpeg":
        image.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    buf = io.BytesIO()
    metadata = {**({"icc_profile": icc_profile} if icc_profile else {}), **({"exif": exif} if exif else {})}
    if ext == ".png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESSION, **metadata)
    elif ext in (".jpg", ".jpeg"):
        image.save(buf, format="JPEG", quality=JPEG_QUALITY, **metadata)
    elif ext == ".webp":
        image.save(buf, format="WEBP", quality=WEBP_QUALITY, **metadata)
    else:
        raise ValueError(f"unknown output extension: {ext!r}")
    return buf.getvalue()


def tmp_root(output_root: str) -> str:
    return join_uri(output_root, TMP_DIR)


def _stage(uri: str, data: bytes, tmp_dir: str) -> str:
    """Write `data` to a fresh file in `tmp_dir` (on `uri`'s filesystem); returns its path."""
    fs, path = split_uri(uri)
    _, tmp = split_uri(join_uri(tmp_dir, f"{uuid.uuid4().hex}{os.path.splitext(path)[1]}"))
    fs.create_dir(posixpath.dirname(tmp), recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    return tmp


def _publish(tmp: str, uri: str) -> None:
    """Move a staged file to `uri`."""
    fs, path = split_uri(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    fs.move(tmp, path)


def atomic_write(uri: str, data: bytes, tmp_dir: str) -> None:
    """Write `data` to a fresh file in `tmp_dir`, then move it to `uri`: a reader (or a rerun
    after a crash) sees the whole file or none."""
    _publish(_stage(uri, data, tmp_dir), uri)


def clear_tmp(output_root: str) -> None:
    """Remove what an interrupted run left in the temporary folder."""
    fs, path = split_uri(tmp_root(output_root))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


FULL_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the output, not the image: stop the job


def write_batch(batch: Dict[str, Sequence], *, output_root: str, parts_dir: Optional[str] = None) -> Dict[str, list]:
    """Pending rows: upscale alpha, encode, write atomically -> status ok; drop the pixel columns.

    With `parts_dir`, the batch's rows (whatever their status) are committed there as one
    manifest part (`commit_manifest_part`) after the images are encoded and staged and before
    they are moved into place: a crash at any point leaves no output without its manifest row."""
    out = {k: list(v) for k, v in batch.items() if k not in ("pixels", "alpha", "dtype", "channels", "icc")}
    staged = []
    for i in range(len(out["input"])):
        if out["status"][i] != PENDING:
            continue
        try:
            shape = (batch["height"][i], batch["width"][i], batch["channels"][i])
            colour = unpack(batch["pixels"][i], batch["dtype"][i], shape)
            alpha = None
            if len(batch["alpha"][i]):
                alpha = unpack(batch["alpha"][i], batch["dtype"][i], (batch["in_height"][i], batch["in_width"][i]))
                alpha = resize_alpha(alpha, shape[:2])
            target = out["output"][i]
            icc = batch["icc"][i] if "icc" in batch else None
            data = encode_image(colour, alpha, os.path.splitext(target)[1].lower(), icc or None,
                                (batch.get("input_sha256") or [""] * len(out["input"]))[i] or "")
            staged.append((i, _stage(target, data, tmp_root(output_root))))
            out["status"][i], out["out_height"][i], out["out_width"][i] = OK, shape[0], shape[1]
        except Exception as err:  # noqa: BLE001
            if isinstance(err, OSError) and err.errno in FULL_STORAGE_ERRNOS:
                raise  # every later write fails too: the job stops (its committed parts are kept)
            out["status"][i], out["error"][i] = ERROR, f"write: {type(err).__name__}: {err}"
    out.pop("height", None), out.pop("width", None)
    if parts_dir:
        commit_manifest_part(out, parts_dir)
    failed = False
    for i, tmp in staged:
        try:
            _publish(tmp, out["output"][i])
        except Exception as err:  # noqa: BLE001
            out["status"][i], out["error"][i], failed = ERROR, f"write: {type(err).__name__}: {err}", True
    if failed and parts_dir:
        commit_manifest_part(out, parts_dir)  # the same inputs: the same part name, replaced
    return out


# ---- the job's streamed stages: listing chunks, probe parts, manifest parts ------------------------
LISTING_COLUMNS = ("input", "relative", "output", "status", "error", "key")


def write_listing(listing: Listing, listing_dir: str, output_root: str, fmt: str, suffix: str = "",
                  rows_per_chunk: int = 50_000) -> Tuple[List[str], List[int], bool]:
    """Stream `listing` into Parquet chunks of about `rows_per_chunk` rows under `listing_dir`
    (columns LISTING_COLUMNS); returns (chunk paths, their row counts, planned). A listing by
    folder is planned here, folder by folder (`plan_outputs`); a Parquet list's rows keep an
    empty output and their `plan_key`, to be planned per key in Ray Data (`plan_batch`). Inputs inside the
    output folder are left out. Holds one group and one chunk at a time."""
    from pipeline import output as layer

    fs, root = split_uri(listing_dir)
    outside = _inside_output(output_root)
    chunk: Dict[str, list] = {k: [] for k in LISTING_COLUMNS}
    paths: List[str] = []
    counts: List[int] = []

    def flush():
        path = f"{root}/listing-{len(paths):06d}.parquet"
        layer.write_parquet_atomic(fs, path, pa_table(chunk), row_group_size=1 << 16)
        paths.append(path)
        counts.append(len(chunk["input"]))
        for column in chunk.values():
            column.clear()

    for group in listing.groups:
        group = [i for i in group if not outside(i.uri)]
        rows = (plan_outputs(group, output_root, fmt, suffix) if listing.by_folder else
                [{"input": i.uri, "output": "", "status": i.status, "error": i.error} for i in group])
        for item, row in zip(group, rows):
            for k, v in _as_text(row).items():
                chunk[k].append(v)
            chunk["relative"].append(names.escaped(item.relative))  # names are planned: for messages only
            chunk["key"].append(plan_key(names.escaped(item.relative)))
        if len(chunk["input"]) >= rows_per_chunk:
            flush()
    if chunk["input"]:
        flush()
    return paths, counts, listing.by_folder


def _as_text(row: Dict[str, str]) -> Dict[str, str]:
    """A planned row {input, output, status, error} with its paths as valid UTF-8 text
    (`pipeline.names.to_text`); an output name that its store cannot hold makes it an error row."""
    text = {"input": names.to_text(row["input"]), "output": "", "status": row["status"], "error": row["error"]}
    try:
        text["output"] = names.to_text(row["output"])
    except names.UnencodableName as err:
        text.update(status=ERROR, error=f"plan: output name {err}")
    return text


def pa_table(columns: Dict[str, Sequence]):
    import pyarrow as pa

    return pa.table({k: list(v) for k, v in columns.items()})


def plan_batch(batch: Dict[str, Sequence], *, output_root: str, fmt: str, suffix: str = "") -> Dict[str, list]:
    """Listing rows {input, relative, status, error, ...} holding every row of their `plan_key`s
    (a Ray Data group) -> planned rows {input, output, status, error}; each input once."""
    unique: Dict[str, Input] = {}
    for uri, relative, status, error in zip(batch["input"], batch["relative"], batch["status"], batch["error"]):
        unique.setdefault(uri, Input(uri, relative, status, error))
    rows = plan_outputs(list(unique.values()), output_root, fmt, suffix)
    return {k: [r[k] for r in rows] for k in ("input", "output", "status", "error")}


MIXED_BUCKETS = "mixed"  # a probe unit's pending rows fall in more than one output-size bucket


def probe_and_commit(batch: Dict[str, Sequence], *, parts_dir: str, pending_dir: str, bucket: int,
                     **probe_options) -> Dict[str, list]:
    """`probe_batch`, then: rows it finished (skipped, error, unsupported) are committed as a
    manifest part under `parts_dir`; pending rows, with their output-size bucket (`bucket_h`,
    `bucket_w`: output sides rounded up to `bucket`, for dense batches), are committed as a part
    under `pending_dir`. Returns one row of counts by status (pending included), and the pending
    part's path, row count and bucket (`pending_part`, `pending_rows`, `pending_bucket`: "HxW" of
    bucket sides when its rows share one, "mixed" when not; "", 0 and "" when none)."""
    from pipeline import output as layer

    probed = probe_batch(batch, **probe_options)
    pending = [i for i, s in enumerate(probed["status"]) if s == PENDING]
    finished = [i for i, s in enumerate(probed["status"]) if s != PENDING]
    if finished:
        commit_manifest_part({k: [v[i] for i in finished] for k, v in probed.items()}, parts_dir)
    part = key = ""
    if pending:
        rows = {k: [v[i] for i in pending] for k, v in probed.items()}
        rows["bucket_h"] = [-(-h // bucket) for h in rows["out_height"]]
        rows["bucket_w"] = [-(-w // bucket) for w in rows["out_width"]]
        fs, root = split_uri(pending_dir)
        part = f"{root}/{layer.content_part_name(rows['input'])}"
        layer.write_parquet_atomic(fs, part, pa_table(rows))
        keys = set(zip(rows["bucket_h"], rows["bucket_w"]))
        key = "x".join(map(str, keys.pop())) if len(keys) == 1 else MIXED_BUCKETS
    counts = {s: [sum(x == s for x in probed["status"])] for s in (PENDING, SKIPPED, ERROR, UNSUPPORTED)}
    return {**counts, "pending_part": [part], "pending_rows": [len(pending)], "pending_bucket": [key]}


def write_and_count(batch: Dict[str, Sequence], *, output_root: str, parts_dir: str) -> Dict[str, list]:
    """`write_batch` committing its manifest part; returns one row of counts (ok, error)."""
    out = write_batch(batch, output_root=output_root, parts_dir=parts_dir)
    return {s: [sum(x == s for x in out["status"])] for s in (OK, ERROR)}


# ---- the manifest -----------------------------------------------------------------------------
MANIFEST_COLUMNS = ("input", "output", "in_height", "in_width", "out_height", "out_width", "seconds",
                    "status", "error", "input_sha256")  # input_sha256: the content the output was made from


def manifest_schema():
    import pyarrow as pa

    return pa.schema([("input", pa.string()), ("output", pa.string()), ("in_height", pa.int32()),
                      ("in_width", pa.int32()), ("out_height", pa.int32()), ("out_width", pa.int32()),
                      ("seconds", pa.float64()), ("status", pa.string()), ("error", pa.string()),
                      ("input_sha256", pa.string())])


def manifest_table(rows: Dict[str, Sequence]):
    """Manifest rows (a dict of columns; missing columns are 0.0 seconds or null) as a table of
    `manifest_schema()`."""
    import pyarrow as pa

    n = len(rows["input"])
    return pa.table({k: list(rows[k]) if k in rows else [0.0 if k == "seconds" else None] * n
                     for k in MANIFEST_COLUMNS}, schema=manifest_schema())


def commit_manifest_part(rows: Dict[str, Sequence], parts_dir: str) -> None:
    """Commit manifest rows atomically as `part-<hash of their inputs>.parquet` in `parts_dir`
    (a retried batch replaces its part, never duplicates it)."""
    from pipeline import output as layer

    if not len(rows["input"]):
        return
    fs, root = split_uri(parts_dir)
    layer.write_parquet_atomic(fs, f"{root}/{layer.content_part_name(rows['input'])}", manifest_table(rows))


def read_manifest_parts(parts_dir: str):
    """Every committed manifest part under `parts_dir` as one table (a killed run's record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline import output as layer

    fs, root = split_uri(parts_dir)
    tables = []
    for path in layer.list_parts(fs, root):
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f).cast(manifest_schema()))
    return pa.concat_tables(tables) if tables else manifest_schema().empty_table()


def consolidate_manifest(parts_dir: str, uri: str) -> Dict[str, int]:
    """The manifest parts under `parts_dir` streamed into one Parquet file at `uri` (one row per
    input, columns MANIFEST_COLUMNS), written atomically; one part in memory at a time. Returns
    the row counts by status."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pipeline import output as layer

    fs, root = split_uri(parts_dir)
    parts = layer.list_parts(fs, root)
    counts: Dict[str, int] = {}

    def write(stream):
        with pq.ParquetWriter(stream, manifest_schema()) as writer:
            for path in parts:
                with fs.open_input_file(path) as f:
                    table = pq.read_table(f).cast(manifest_schema())
                writer.write_table(table)
                for item in pc.value_counts(table.column("status")).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    manifest_fs, path = split_uri(uri)
    layer.atomic_write(manifest_fs, path, write)
    return counts
