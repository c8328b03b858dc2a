"""Files in, files out for bulk upscaling: listing, output names, probing, decoding, writing.

Each stage is a plain function over a batch dict (column -> sequence), callable on one image in
a test without Ray; `jobs/upscale.py` chains them with Ray Data. Rows carry images between stages
as raw bytes (`pixels`, `alpha`) plus shape and dtype columns, never as tensor columns.

Format rules: PNG, JPEG and WebP out (`same` keeps PNG / JPEG / WebP inputs' format, other
inputs become PNG); 16-bit in -> 16-bit out (PNG; JPEG and WebP are 8-bit formats); alpha is
upscaled separately (bicubic) and kept (a JPEG target for an image with alpha is written as PNG,
as Real-ESRGAN does); grayscale stays grayscale (except WebP, which has no gray mode); EXIF
orientation is applied on decode. Writes are atomic (temporary file in `TMP_DIR`, then a move);
an output that exists, opens and has the expected size counts as done on a rerun.
"""
from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import struct
import uuid
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.fs as pafs

from pipeline.storage import join_uri, resolve_fs

from flowsr.sample import output_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
OUTPUT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}
OUTPUT_FORMATS = ("same", "png", "jpg", "webp")
TMP_DIR = ".flowsr-tmp"  # under the output root; emptied at the start and end of every run
MANIFEST_NAME = "manifest.parquet"
JPEG_QUALITY = 95
WEBP_QUALITY = 95
PNG_COMPRESSION = 3  # zlib level 0-9: 3 is close to 9 in size for photos and several times faster
EXIF_ORIENTATION = 0x0112
HEADER_BYTES = 1 << 20  # read to probe an input's header
GLOB_CHARS = "*?["

# status of a row: pending (to do), ok (written now), skipped (valid output existed), error
PENDING, OK, SKIPPED, ERROR = "pending", "ok", "skipped", "error"


# ---- paths and filesystems ----------------------------------------------------------------------
split_uri = resolve_fs  # the name this module has always used


def _with_scheme(root: str, path: str) -> str:
    """`path` from a listing of `root`'s filesystem as a URI of the same kind as `root`."""
    return f"{root.split('://', 1)[0]}://{path}" if "://" in root and not root.startswith("file://") else path


def _list_files(fs: pafs.FileSystem, root: str) -> List[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if root else path


def list_inputs(source: str, *, path_column: str = "path") -> List[Tuple[str, str]]:
    """(input URI, name relative to the input root), sorted, for a directory (image files
    under it, recursively), a glob (`**` crosses directories), one file, or a Parquet file with
    a `path_column` column (names relative to the deepest common directory)."""
    if source.endswith(".parquet"):
        return _list_parquet(source, path_column)
    fs, path = split_uri(source)
    if any(ch in path for ch in GLOB_CHARS):
        root = path
        while any(ch in root for ch in GLOB_CHARS):
            root = posixpath.dirname(root)
        pattern = _relative(path, root)
        files = [p for p in _list_files(fs, root) if _glob_match(_relative(p, root), pattern)]
        return [(_with_scheme(source, p), _relative(p, root)) for p in files]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return [(_with_scheme(source, p), _relative(p, path)) for p in _list_files(fs, path) if _is_image(p)]
    if info.type == pafs.FileType.File:
        return [(source, posixpath.basename(path))]
    raise FileNotFoundError(f"no input at {source}")


def _glob_match(relative: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    return pattern.startswith("**/") and _glob_match(relative, pattern[3:])


def _list_parquet(source: str, path_column: str) -> List[Tuple[str, str]]:
    import pyarrow.parquet as pq

    fs, path = split_uri(source)
    table = pq.read_table(path, columns=[path_column], filesystem=fs)
    uris = sorted(set(u for u in table.column(path_column).to_pylist() if u))
    paths = [u.split("://", 1)[-1] for u in uris]
    if not paths:
        return []
    root = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    if root in paths:  # one path is a prefix of all others (cannot be a file then): its parent
        root = posixpath.dirname(root)
    return [(u, _relative(p, root)) for u, p in zip(uris, paths)]


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


def plan_outputs(inputs: Sequence[Tuple[str, str]], output_root: str, fmt: str,
                 suffix: str = "") -> List[Dict[str, str]]:
    """Rows {input, output} with one distinct output per input: names that several inputs would
    share (a.png and a.jpg -> a.png) keep the input extension (a.png.png, a.jpg.png). Inputs
    inside the output folder (earlier outputs, when OUT lies under IN) are left out."""
    inside = output_root.rstrip("/") + "/"
    if "://" not in output_root:
        inside = os.path.abspath(output_root) + os.sep
    inputs = [(uri, rel) for uri, rel in inputs if not uri.startswith(inside)]
    names = [output_name(rel, fmt, suffix) for _, rel in inputs]
    counts: Dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    rows = []
    for (uri, rel), name in zip(inputs, names):
        if counts[name] > 1:
            name = rel + suffix + os.path.splitext(name)[1]
        rows.append({"input": uri, "output": join_uri(output_root, name)})
    return rows


# ---- probing: header-only size and the resume check ---------------------------------------------
def _read_bytes(uri: str) -> bytes:
    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _header(uri: str):
    """A Pillow image opened lazily (header only) from the first HEADER_BYTES of `uri`, or from
    the whole file when the header is longer than that."""
    from PIL import Image

    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        head = f.read(HEADER_BYTES)
        try:
            return Image.open(io.BytesIO(head))
        except Exception:  # noqa: BLE001 — a header past HEADER_BYTES, or not an image at all
            if len(head) < HEADER_BYTES:
                raise
            return Image.open(io.BytesIO(head + f.read()))


def header_size(f) -> Tuple[int, int, bool]:
    """(height, width, has_alpha) from an image header (a file or a lazily opened image), after
    EXIF orientation; no pixel decode."""
    from PIL import Image

    with (f if isinstance(f, Image.Image) else Image.open(f)) as im:
        w, h = im.size
        # PNG keeps EXIF before IDAT (in `info` after the header) or after it, where reading it
        # would decode the whole image: only the first kind counts here
        has_exif = im.format != "PNG" or "exif" in im.info
        orientation = im.getexif().get(EXIF_ORIENTATION, 1) if has_exif else 1
        alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    return (w, h, alpha) if orientation in (5, 6, 7, 8) else (h, w, alpha)


def is_valid_output(uri: str, size: Tuple[int, int]) -> bool:
    """The output exists, its image structure checks out and it is (H, W) = `size`."""
    from PIL import Image

    fs, path = split_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        with Image.open(io.BytesIO(_read_bytes(uri))) as im:
            if (im.size[1], im.size[0]) != tuple(size):
                return False
            im.verify()
        return True
    except Exception:  # noqa: BLE001 — any failure to read back means "not done"
        return False


def probe_batch(batch: Dict[str, Sequence], *, scale: float, resume: bool = True) -> Dict[str, list]:
    """Rows {input, output} -> + in/out sizes and status: skipped when a valid output exists
    (and `resume`; the run record guarantees it was made with the same settings), error when
    the header does not parse, else pending. JPEG targets of images with alpha become PNG
    targets."""
    out = {k: [] for k in ("input", "output", "in_height", "in_width", "out_height", "out_width",
                           "status", "error")}
    for uri, target in zip(batch["input"], batch["output"]):
        h = w = H = W = 0
        status, error = PENDING, ""
        try:
            h, w, alpha = header_size(_header(uri))
            H, W = output_size(h, w, scale)
            if alpha and os.path.splitext(target)[1] in (".jpg", ".jpeg"):
                target = os.path.splitext(target)[0] + ".png"
            if resume and is_valid_output(target, (H, W)):
                status = SKIPPED
        except Exception as err:  # noqa: BLE001 — a bad file becomes an error row
            status, error = ERROR, f"probe: {type(err).__name__}: {err}"
        for k, v in zip(out, (uri, target, h, w, H, W, status, error)):
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


def decode_batch(batch: Dict[str, Sequence]) -> Dict[str, list]:
    """Pending rows: read and decode (pipeline.images.load_image) into raw `pixels` (HxWxC, C = 1
    or 3), `alpha` (HxW, or empty), `dtype`, `height`, `width`, `channels`, `icc` (the input's ICC
    profile, or empty). Failures -> error rows."""
    from pipeline.images import load_image

    out = {k: list(v) for k, v in batch.items()}
    cols = {k: [] for k in ("pixels", "alpha", "dtype", "height", "width", "channels", "icc")}
    for i, uri in enumerate(batch["input"]):
        values = (b"", b"", "", 0, 0, 0, b"")
        if out["status"][i] == PENDING:
            try:
                decoded = load_image(_read_bytes(uri), uri)
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


def _with_iccp(png: bytes, icc_profile: bytes) -> bytes:
    """`png` with an iCCP chunk (the ICC profile, zlib-compressed) right after its IHDR chunk."""
    end_of_ihdr = 8 + 4 + 4 + 13 + 4  # signature, then length, type, 13 data bytes, CRC
    data = b"ICC profile\x00\x00" + zlib.compress(icc_profile)
    chunk = struct.pack(">I", len(data)) + b"iCCP" + data + struct.pack(">I", zlib.crc32(b"iCCP" + data))
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def encode_image(colour: np.ndarray, alpha: Optional[np.ndarray], ext: str,
                 icc_profile: Optional[bytes] = None) -> bytes:
    """HxWxC (C = 1 or 3) uint8 / uint16 colour + optional HxW alpha -> file bytes of format `ext`.
    16 bits are kept in PNG; JPEG and WebP get 8 bits; JPEG drops alpha. `icc_profile` (the
    input's: the pixels are still in its colour space) is embedded in every format."""
    from PIL import Image

    if ext == ".png" and colour.dtype == np.uint16:
        channels = [colour] if alpha is None else [colour, alpha[..., None]]
        png = _png16(np.concatenate(channels, axis=2))
        return _with_iccp(png, icc_profile) if icc_profile else png
    if colour.dtype == np.uint16:
        colour = (colour.astype(np.uint32) * 255 + 32767) // 65535
        alpha = None if alpha is None else (alpha.astype(np.uint32) * 255 + 32767) // 65535
    colour = colour.astype(np.uint8)
    image = Image.fromarray(colour[..., 0] if colour.shape[2] == 1 else colour)
    if alpha is not None and ext != ".jpg" and ext != ".jpeg":
        image.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    buf = io.BytesIO()
    icc = {"icc_profile": icc_profile} if icc_profile else {}
    if ext == ".png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESSION, **icc)
    elif ext in (".jpg", ".jpeg"):
        image.save(buf, format="JPEG", quality=JPEG_QUALITY, **icc)
    elif ext == ".webp":
        image.save(buf, format="WEBP", quality=WEBP_QUALITY, **icc)
    else:
        raise ValueError(f"unknown output extension: {ext!r}")
    return buf.getvalue()


def tmp_root(output_root: str) -> str:
    return join_uri(output_root, TMP_DIR)


def atomic_write(uri: str, data: bytes, tmp_dir: str) -> None:
    """Write `data` to a fresh file in `tmp_dir`, then move it to `uri`: a reader (or a rerun
    after a crash) sees the whole file or none."""
    fs, path = split_uri(uri)
    _, tmp = split_uri(join_uri(tmp_dir, f"{uuid.uuid4().hex}{os.path.splitext(path)[1]}"))
    fs.create_dir(posixpath.dirname(tmp), recursive=True)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def clear_tmp(output_root: str) -> None:
    """Remove what an interrupted run left in the temporary folder."""
    fs, path = split_uri(tmp_root(output_root))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def write_batch(batch: Dict[str, Sequence], *, output_root: str) -> Dict[str, list]:
    """Pending rows: upscale alpha, encode, write atomically -> status ok; drop the pixel columns."""
    out = {k: list(v) for k, v in batch.items() if k not in ("pixels", "alpha", "dtype", "channels", "icc")}
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
            atomic_write(target, encode_image(colour, alpha, os.path.splitext(target)[1].lower(), icc or None),
                         tmp_root(output_root))
            out["status"][i], out["out_height"][i], out["out_width"][i] = OK, shape[0], shape[1]
        except Exception as err:  # noqa: BLE001
            out["status"][i], out["error"][i] = ERROR, f"write: {type(err).__name__}: {err}"
    out.pop("height", None), out.pop("width", None)
    return out


# ---- the manifest -----------------------------------------------------------------------------
MANIFEST_COLUMNS = ("input", "output", "in_height", "in_width", "out_height", "out_width", "seconds",
                    "status", "error")


def manifest_schema():
    import pyarrow as pa

    return pa.schema([("input", pa.string()), ("output", pa.string()), ("in_height", pa.int32()),
                      ("in_width", pa.int32()), ("out_height", pa.int32()), ("out_width", pa.int32()),
                      ("seconds", pa.float64()), ("status", pa.string()), ("error", pa.string())])


def write_manifest(rows: List[dict], uri: str, tmp_dir: str) -> None:
    """One Parquet file, one row per input (columns MANIFEST_COLUMNS), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r.get(k, 0.0 if k == "seconds" else None) for k in MANIFEST_COLUMNS}
                                  for r in rows], schema=manifest_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(uri, buf.getvalue(), tmp_dir)
