"""Data stage: image files -> (HR patch, Real-ESRGAN LR) pairs in Parquet shards, on Ray Data.

    python -m jobs.prepare_data --input DIR|FILE|URI --output URI [--glob] [--patch-size 512]
        [--crops-per-image N] [--crop-mode random|grid] [--degradation realesrgan|bicubic]
        [--scale 4] [--seed 0] [--shard-rows N] [--max-pixels N] [--max-bytes N]
        [--captioner off|template|qwen2vl] [--overwrite] [--address ...] [--num-cpus ...]

The pairs are built by `pipeline.pairs` (per file: crops and degradations drawn from the
content digest) in the Ray Data plan of `pipeline.pairs_dataset`, which also owns the output's
layout (shards/, errors/, manifest.json) and its resume.

Inputs: a literal path (file or directory) is never read as a glob; `--glob` (or a path that
does not exist) makes it one. Directories are walked recursively, following directory
symlinks once per real directory. Only regular files are read (a FIFO or a device is an error
row); a file above `--max-bytes` or an image whose header says more than `--max-pixels` pixels
is an error row before it is decoded; a file without an image extension is an "unsupported"
row. Hidden files are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from dataclasses import asdict, fields
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow.fs as pafs

from jobs.common import (EXIT_OK, add_allow_errors_arg, add_ray_args, connect_first, exit_status, init_ray,
                         job_main)
from pipeline.storage import is_local, resolve_fs
from pipeline import names
from pipeline import output as out
from pipeline.done_index import INDEX_DIR, build_done_index
from pipeline.listing import ListingUnits
from pipeline import pairs_dataset as dataset
from pipeline.degrade import DEGRADATION_KINDS
from pipeline.images import ALPHA_MODES
from pipeline import inputs
from pipeline.pairs import CAPTIONERS, CROP_MODES, PrepareConfig, SourceReader
from pipeline.pairs_dataset import ERRORS_DIR, MANIFEST_FILE, SHARDS_DIR, WORK_DIR



# ---------------------------------------------------------------------------------------------
# Listing inputs
# ---------------------------------------------------------------------------------------------

def _hidden(uri: str) -> bool:
    return uri.rsplit("/", 1)[-1].startswith(".")


def iter_listing(input_uri: str, as_glob: bool = False, exclude: Sequence[str] = ()
                 ) -> Iterator[Tuple[str, Optional[str]]]:
    """(uri, reject reason or None) of every non-hidden file of the input, listed by the one
    input layer (`pipeline.inputs.list_input_groups`: a folder, a glob, one file or a Parquet
    list; loop-safe, a folder at a time). Files without an image extension come with the reason
    they are not read; files that cannot be read (a FIFO, a device) are candidates whose read
    fails with an error row. A glob that matches nothing is a FileNotFoundError."""
    fs, path = inputs.split_uri(input_uri)
    literal = not as_glob and fs.get_file_info(path).type != pafs.FileType.NotFound
    listing = inputs.list_input_groups(input_uri, glob=True if as_glob else None, exclude=exclude)
    matched = False
    for group in listing.groups:
        for item in group:
            matched = True
            if not _hidden(item.uri):
                yield item.uri, (item.error if item.status == inputs.UNSUPPORTED else None)
    if not matched and not literal:
        raise FileNotFoundError(f"input not found: no path matches the glob {input_uri!r}")


def list_sources(input_uri: str, as_glob: bool = False) -> List[str]:
    """Sorted image files of the input (`iter_listing` without the files it does not read)."""
    return sorted(uri for uri, reject in iter_listing(input_uri, as_glob) if reject is None)


class InputTooLarge(OSError):
    """A file above the byte cap, or not a regular file."""


def read_bytes(uri: str, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of a regular file (local path or pyarrow URI), at most `max_bytes`.

    Raises InputTooLarge for special files (FIFO, device, socket) and files above the cap:
    neither is ever opened for reading. A local name that is not UTF-8 comes as the file:// URI
    of `pipeline.names.to_text`.
    """
    uri = names.from_text(uri)
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InputTooLarge(f"not a regular file ({_file_kind(info.st_mode)})")
        if max_bytes is not None and info.st_size > max_bytes:
            raise InputTooLarge(f"file too large: {info.st_size} bytes > max_bytes {max_bytes}")
        with open(path, "rb") as f:
            # a buffer of the file's size, not the cap's (a 256 MB read buffer costs 30 us a file)
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew since the stat: read on, up to the cap
                data += f.read(max_bytes + 1 - len(data) if max_bytes is not None else -1)
    else:
        fs, path = resolve_fs(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise InputTooLarge(f"not a regular file ({info.type.name})")
        if max_bytes is not None and info.size is not None and info.size > max_bytes:
            raise InputTooLarge(f"file too large: {info.size} bytes > max_bytes {max_bytes}")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1 if max_bytes is not None else None)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputTooLarge(f"file too large: more than max_bytes {max_bytes} bytes")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


READER = SourceReader(read_bytes, InputTooLarge)  # how the degrade tasks read a listed file


def write_work_listing(cfg: PrepareConfig, output: out.Output) -> ListingUnits:
    """The input's files, listed into the output's `_work/` units (`pipeline.pairs_dataset`)."""
    exclude = [output.root if is_local(cfg.output) else output.uri]  # when it lies inside the input
    files = iter_listing(cfg.input, cfg.glob, exclude)
    return dataset.write_work_units(output, files, cfg.files_per_task)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig, *, on_shard: Optional[Callable[[Dict[str, Any]], None]] = None
            ) -> Dict[str, Any]:
    """Run the data stage; returns a summary dict. `on_shard` sees each shard as it is written.

    Raises OutputBusy when another run holds the output, RunMismatch when it holds pairs made
    with other settings (both one-line `pipeline.output.OutputError`s).
    """
    start = time.perf_counter()
    connected = connect_first(cfg.address)  # a cluster that does not answer: one line, the output untouched
    try:
        with out.open_output(cfg.output, cfg.record(), overwrite=cfg.overwrite) as output:
            fs, root = output.fs, output.root
            out.remove_file(output.uri_of(MANIFEST_FILE))  # written again only when this run finishes
            listing = write_work_listing(cfg, output)
            listed = sum(listing.rows)
            shard_parts, pairs_before = dataset.count_rows(fs, root, SHARDS_DIR)
            error_parts, errors_before = dataset.count_rows(fs, root, ERRORS_DIR)
            pairs = shards = 0
            if listing.count:
                started = init_ray(cfg.address, num_cpus=cfg.num_cpus)
                try:
                    shards_done = build_done_index(output, shard_parts, "sample_id", SHARDS_DIR)
                    errors_done = build_done_index(output, error_parts, "source_uri", ERRORS_DIR)
                    for row in dataset.build_dataset(listing, cfg, READER, shards_done, errors_done).iter_rows():
                        pairs, shards = pairs + row["rows"], shards + 1
                        if on_shard is not None:
                            on_shard(row)
                finally:
                    if started:
                        import ray

                        ray.shutdown()
            manifest = dataset.write_manifest(fs, root, cfg)
            out.remove_dir(fs, output.path(WORK_DIR))
            out.remove_dir(fs, output.path(INDEX_DIR))
    finally:
        if connected:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - start
    n_errors = manifest["errors"]["rows"]
    summary = {"output": cfg.output, "sources": listed, "resumed": output.resumed,
               "pairs_written": pairs, "shards_written": shards,
               "errors_new": n_errors - errors_before, "total_pairs": manifest["total_rows"],
               "total_shards": len(manifest["shards"]), "total_errors": n_errors,
               "failed": manifest["errors"]["failed"],
               "seconds": round(seconds, 3), "pairs_per_s": round(pairs / max(seconds, 1e-9), 2)}
    print(f"prepare_data: wrote {pairs} pairs in {shards} shards ({summary['pairs_per_s']} pairs/s, "
          f"{seconds:.1f} s); {summary['errors_new']} new error rows; {listed} files listed; "
          f"output holds {summary['total_pairs']} pairs in {summary['total_shards']} shards, "
          f"{n_errors} error rows -> {cfg.output}", flush=True)
    return summary


def add_options(p: argparse.ArgumentParser) -> None:
    defaults = PrepareConfig(input="-", output="-")
    p.add_argument("--input", required=True,
                   help="a folder, file, glob or Parquet list (a `path` column) of images; a local path or a URI")
    p.add_argument("--output", required=True, help="output dir or URI (s3://, gs://, ...)")
    p.add_argument("--glob", action="store_true",
                   help="read --input as a glob pattern (a path that exists is otherwise literal)")
    p.add_argument("--patch-size", type=int, default=defaults.patch_size,
                   help="HR crop size, pixels")
    p.add_argument("--crops-per-image", type=int, default=defaults.crops_per_image,
                   help="HR crops taken from each source image")
    p.add_argument("--crop-mode", choices=CROP_MODES, default=defaults.crop_mode,
                   help="where crops are taken: random (seeded by content) or a grid")
    p.add_argument("--degradation", choices=DEGRADATION_KINDS, default=defaults.degradation,
                   help="realesrgan (second-order, the paper) or bicubic x4")
    p.add_argument("--scale", type=int, default=defaults.scale,
                   help="SR factor: LR side = patch size / scale")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="global seed; each pair draws from (seed, sample_id)")
    p.add_argument("--shard-rows", type=int, default=defaults.shard_rows,
                   help="pairs per Parquet shard")
    p.add_argument("--captioner", choices=CAPTIONERS, default=defaults.captioner,
                   help="caption columns: off, template (from the degradation), qwen2vl (use jobs.caption for a VLM at scale)")
    p.add_argument("--files-per-task", type=int, default=defaults.files_per_task,
                   help="source files per unit of work; a degrade task works through a run of units "
                        "(about four tasks per cluster CPU)")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers,
                   help="at most this many degrade tasks at once (default: as many as CPUs)")
    p.add_argument("--alpha", choices=ALPHA_MODES, default=defaults.alpha,
                   help="what to do with an alpha channel before cropping")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="larger images (by their header) are error rows, never decoded")
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                   help="larger files are error rows, never read")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the output's earlier results instead of resuming them")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--dry-run", action="store_true", help="print the config and inputs, write nothing")
    add_allow_errors_arg(p)
    add_ray_args(p)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    names = {f.name for f in fields(PrepareConfig)}
    return PrepareConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    """The exit status (`jobs.common.exit_status`): 1 when the output holds error rows of files
    that failed (`--allow-errors`: 0)."""
    cfg = config_from_args(args)
    if args.dry_run:
        sources = list_sources(cfg.input, cfg.glob)
        print(json.dumps({**asdict(cfg), "sources": len(sources)}, indent=2))
        return EXIT_OK
    summary = prepare(cfg)
    return exit_status(summary["failed"], args.allow_errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_main("prepare-data", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
