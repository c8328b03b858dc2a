"""The bulk upscaler's stages: probe -> decode -> upscale -> encode and write, and their Ray adapters.

Each stage is a plain function (or, for the model, a stateful callable) over a batch dict
(column -> sequence), callable on one image in a test without Ray; `arrow` and
`ArrowUpscaleStage` adapt them to the pyarrow batches that `pipeline.upscale_flow` passes
between Ray Data stages. Rows carry images as raw bytes (`pixels`, `alpha`) plus shape and
dtype columns, never as tensor columns; a row's `status` (`pipeline.inputs`) says what is left
to do, and a failure becomes an error row, never a failed batch (except a full disk, which
stops the job).

Format rules: `same` keeps PNG / JPEG / WebP inputs' format, other inputs become PNG; 16-bit in
-> 16-bit out (PNG); alpha is upscaled separately (bicubic) and kept (a JPEG target for an image
with alpha is written as PNG, as Real-ESRGAN does); grayscale stays grayscale (except WebP);
EXIF orientation is applied on decode. Writes are atomic and in two steps (`write_batch`):
the batch's images are staged in the output's TMP_DIR, its manifest part is committed, then
the images are moved into place, so no output is ever without its manifest row.

Identity of an input is its content: on a rerun an output counts as done when it exists, opens,
has the expected size and records the sha256 of the input as it is now (`probe_batch`,
`pipeline.image_codecs.output_source`); each probe reads its own input and output, with no earlier
manifest and no state in the driver.
"""
from __future__ import annotations

import errno
import os
import posixpath
import uuid
from typing import Dict, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline import output as layer
from pipeline.fingerprint import bytes_digest
from pipeline.image_codecs import (encode_image, file_digest, header_size, output_source, read_header,
                                   resize_alpha, split_channels, unpack)
from pipeline.images import load_image
from pipeline.inputs import (ERROR, MAX_BYTES, MAX_OUTPUT_PIXELS, MAX_PIXELS, OK, PENDING, SKIPPED, UNSUPPORTED,
                             check_input, check_pixels, read_bytes, split_uri)
from pipeline.naming import jpeg_twin, tmp_root
from pipeline.storage import cached_copy, join_uri
from pipeline.upscale_manifest import commit_manifest_part

from flowsr.tiling import output_size

FULL_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the output, not the image: stop the job
MIXED_BUCKETS = "mixed"  # a probe unit's pending rows fall in more than one output-size bucket
BINARY_COLUMNS = ("pixels", "alpha")  # raw image bytes: large_binary in Arrow (a batch can pass 2 GB)


# ---- probing: header-only size and the resume check ---------------------------------------------
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
                h, w, alpha = header_size(read_header(uri))
                H, W = output_size(h, w, scale)
                check_pixels(h, w, H, W, max_pixels, max_output_pixels)
                if alpha:
                    target = jpeg_twin(target) or target
                recorded = output_source(target, (H, W)) if resume else None
                if recorded and recorded == file_digest(uri):
                    status, digest = SKIPPED, recorded
            except Exception as err:  # noqa: BLE001 — a bad file becomes an error row
                status, error = ERROR, f"probe: {type(err).__name__}: {err}"
        for k, v in zip(out, (uri, target, h, w, H, W, status, error, digest)):
            out[k].append(v)
    return out


# ---- decoding ---------------------------------------------------------------------------------
def decode_batch(batch: Dict[str, Sequence], *, max_pixels: int = MAX_PIXELS) -> Dict[str, list]:
    """Pending rows: read and decode (pipeline.images.load_image, under the `max_pixels` cap) into
    raw `pixels` (HxWxC, C = 1 or 3), `alpha` (HxW, or empty), `dtype`, `height`, `width`,
    `channels`, `icc` (the input's ICC profile, or empty), and `input_sha256`: the digest of the
    bytes decoded. Failures -> error rows."""
    out = {k: list(v) for k, v in batch.items()}
    out.setdefault("input_sha256", [""] * len(out["input"]))
    cols = {k: [] for k in ("pixels", "alpha", "dtype", "height", "width", "channels", "icc")}
    for i, uri in enumerate(batch["input"]):
        values = (b"", b"", "", 0, 0, 0, b"")
        if out["status"][i] == PENDING:
            try:
                data = read_bytes(uri)
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
        from pipeline.sr_models import load_upscaler  # torch: loaded in the actor only

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


# ---- encoding and two-step atomic writes -------------------------------------------------------
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


# ---- the streamed job's units: probe parts and write counts -------------------------------------
def probe_and_commit(batch: Dict[str, Sequence], *, parts_dir: str, pending_dir: str, bucket: int,
                     **probe_options) -> Dict[str, list]:
    """`probe_batch`, then: rows it finished (skipped, error, unsupported) are committed as a
    manifest part under `parts_dir`; pending rows, with their output-size bucket (`bucket_h`,
    `bucket_w`: output sides rounded up to `bucket`, for dense batches), are committed as a part
    under `pending_dir`. Returns one row of counts by status (pending included), and the pending
    part's path, row count and bucket (`pending_part`, `pending_rows`, `pending_bucket`: "HxW" of
    bucket sides when its rows share one, "mixed" when not; "", 0 and "" when none)."""
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
        layer.write_parquet_atomic(fs, part, pa.table(rows))
        keys = set(zip(rows["bucket_h"], rows["bucket_w"]))
        key = "x".join(map(str, keys.pop())) if len(keys) == 1 else MIXED_BUCKETS
    counts = {s: [sum(x == s for x in probed["status"])] for s in (PENDING, SKIPPED, ERROR, UNSUPPORTED)}
    return {**counts, "pending_part": [part], "pending_rows": [len(pending)], "pending_bucket": [key]}


def write_and_count(batch: Dict[str, Sequence], *, output_root: str, parts_dir: str) -> Dict[str, list]:
    """`write_batch` committing its manifest part; returns one row of counts (ok, error)."""
    out = write_batch(batch, output_root=output_root, parts_dir=parts_dir)
    return {s: [sum(x == s for x in out["status"])] for s in (OK, ERROR)}


# ---- Ray Data adapters: the stages over pyarrow batches -------------------------------------------
def to_table(columns: Dict[str, Sequence]) -> pa.Table:
    """A batch dict as a pyarrow table (BINARY_COLUMNS as large_binary)."""
    return pa.table({k: pa.array(v, type=pa.large_binary()) if k in BINARY_COLUMNS else v
                     for k, v in columns.items()})


def arrow(fn, **kwargs):
    """A dict-of-lists stage `fn(batch, **kwargs)` as a pyarrow-batch function."""
    def run(table: pa.Table) -> pa.Table:
        return to_table(fn(table.to_pydict(), **kwargs))
    return run


class ArrowUpscaleStage(UpscaleStage):
    """`UpscaleStage` over pyarrow batches (the actor class of the Ray Data pipeline)."""

    def __call__(self, table: pa.Table) -> pa.Table:
        return to_table(super().__call__(table.to_pydict()))
