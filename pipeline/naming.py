"""Where each input's output goes: output names, their planning, and the job's own folders.

An output mirrors its input's name relative to the input root (same folders and stem, the
output format's extension) under the output root. Planning (`plan_outputs`) gives every input
its own name inside the output folder, deterministically and never two inputs one name; names
only compete within one folder (`plan_key`), so a corpus is planned folder by folder
(`write_listing`) or, for a Parquet list in any order, group by group inside Ray Data
(`plan_batch`). Rows are dicts {input, output, status, error} (statuses: `pipeline.inputs`).

The output root also holds the job's own folders (RESERVED_DIRS), which no output may enter:
TMP_DIR (staged images, listing chunks, pending parts; removed whole at the start and end of a
run) and PARTS_DIR (the manifest, committed part by part during a run, `pipeline.upscale_manifest`).
"""
from __future__ import annotations

import os
import posixpath
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa

from pipeline import names
from pipeline import output as layer
from pipeline.inputs import ERROR, PENDING, Input, Listing, split_uri
from pipeline.storage import join_uri

OUTPUT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
OUTPUT_FORMATS = ("same", "png", "jpg", "webp")
TMP_DIR = ".flowsr-tmp"  # under the output root; emptied at the start and end of every run
MANIFEST_NAME = "manifest.parquet"
PARTS_DIR = "_manifest-parts"  # under the output root: the manifest, committed batch by batch during a run
RESERVED_DIRS = (TMP_DIR, PARTS_DIR)  # the job's own folders under the output root
LISTING_COLUMNS = ("input", "relative", "output", "status", "error", "key")


def tmp_root(output_root: str) -> str:
    """The job's temporary folder under `output_root` (TMP_DIR)."""
    return join_uri(output_root, TMP_DIR)


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


def jpeg_twin(name: str) -> Optional[str]:
    """The PNG name a JPEG target becomes when its image has alpha (`pipeline.upscale_stages.probe_batch`);
    None for a target that is not JPEG."""
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
            twin = jpeg_twin(name)
            keys = {name.casefold(), *([twin.casefold()] if twin else [])}
            if not keys & taken:
                taken |= keys
                break
        if not contained(name):
            rows[k].update(status=ERROR, error=f"plan: output {name!r} resolves outside the output folder")
            continue
        rows[k]["output"] = join_uri(output_root, name)
    return rows


# ---- a corpus planned at scale ------------------------------------------------------------------
def write_listing(listing: Listing, listing_dir: str, output_root: str, fmt: str, suffix: str = "",
                  rows_per_chunk: int = 50_000) -> Tuple[List[str], List[int], bool]:
    """Stream `listing` into Parquet chunks of about `rows_per_chunk` rows under `listing_dir`
    (columns LISTING_COLUMNS); returns (chunk paths, their row counts, planned). A listing by
    folder is planned here, folder by folder (`plan_outputs`); a Parquet list's rows keep an
    empty output and their `plan_key`, to be planned per key in Ray Data (`plan_batch`). Inputs inside the
    output folder are left out. Holds one group and one chunk at a time."""
    fs, root = split_uri(listing_dir)
    outside = _inside_output(output_root)
    chunk: Dict[str, list] = {k: [] for k in LISTING_COLUMNS}
    paths: List[str] = []
    counts: List[int] = []

    def flush():
        path = f"{root}/listing-{len(paths):06d}.parquet"
        layer.write_parquet_atomic(fs, path, pa.table(chunk), row_group_size=1 << 16)
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


def plan_batch(batch: Dict[str, Sequence], *, output_root: str, fmt: str, suffix: str = "") -> Dict[str, list]:
    """Listing rows {input, relative, status, error, ...} holding every row of their `plan_key`s
    (a Ray Data group) -> planned rows {input, output, status, error}; each input once."""
    unique: Dict[str, Input] = {}
    for uri, relative, status, error in zip(batch["input"], batch["relative"], batch["status"], batch["error"]):
        unique.setdefault(uri, Input(uri, relative, status, error))
    rows = plan_outputs(list(unique.values()), output_root, fmt, suffix)
    return {k: [r[k] for r in rows] for k in ("input", "output", "status", "error")}
