"""Image files for the bulk upscaler: header probing, the resume check, and the encoders.

Probing reads only a header (`read_header`, `header_size`: the size after EXIF orientation, and
whether there is alpha), never the pixels. An output records the sha256 of the input bytes it was
made from (EXIF ImageDescription: SOURCE_DIGEST_PREFIX + digest; `source_exif`), which
`output_source` reads back: that is the whole resume check (`pipeline.upscale_stages.probe_batch`).

Encoding (`encode_image`): PNG, JPEG and WebP; 16-bit colour is kept in PNG (written by OpenCV,
or by hand for gray + alpha, which OpenCV cannot write), JPEG and WebP get 8 bits, JPEG drops
alpha; the input's ICC profile and the source digest are embedded in every format. Decoding
itself is `pipeline.images.load_image`; rows carry pixels as raw bytes (`unpack`).
"""
from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import Optional, Tuple

import cv2
import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from pipeline.images import EXIF_ORIENTATION_TAG, PNG_SIGNATURE, open_header
from pipeline.inputs import read_bytes, split_uri

JPEG_QUALITY = 95
WEBP_QUALITY = 95
PNG_COMPRESSION = 3  # zlib level 0-9: 3 is close to 9 in size for photos and several times faster
HEADER_BYTES = 1 << 20  # read to probe an input's header
PNG_TAIL_BYTES = 1 << 16  # read from a PNG's end to find an eXIf chunk that follows the image data
SOURCE_DIGEST_TAG = 0x010E  # EXIF ImageDescription of an output: SOURCE_DIGEST_PREFIX + its input's sha256
SOURCE_DIGEST_PREFIX = "flowsr source sha256:"
DIGEST_READ_BYTES = 1 << 22  # an input is hashed in reads of this size
EXIF_HEADER = b"Exif\x00\x00"  # what Pillow's EXIF blocks start with; a PNG eXIf chunk holds the rest
PNG_IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, 13 data bytes, CRC


# ---- probing: header-only size and the resume check ---------------------------------------------
def read_header(uri: str) -> Image.Image:
    """A Pillow image opened lazily (header only) from the first HEADER_BYTES of `uri`, or from
    the whole file when the header is longer than that. A PNG's eXIf chunk that follows the image
    data is found from the file's tail (PNG_TAIL_BYTES) and put in `info`, as Pillow would after
    a full decode, so the EXIF orientation counts either way."""
    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        head = f.read(HEADER_BYTES)
        try:  # open_header: the caps (`check_pixels`) apply, not Pillow's bomb limit
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


def header_size(f) -> Tuple[int, int, bool]:
    """(height, width, has_alpha) from an image header (a file or a lazily opened image), after
    EXIF orientation; no pixel decode."""
    with (f if isinstance(f, Image.Image) else Image.open(f)) as im:
        w, h = im.size
        # PNG keeps EXIF before IDAT (in `info` after the header) or after it (put in `info` by
        # `read_header`); getexif() on a PNG without it would decode the whole image
        has_exif = im.format != "PNG" or "exif" in im.info
        orientation = im.getexif().get(EXIF_ORIENTATION_TAG, 1) if has_exif else 1
        alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    return (w, h, alpha) if orientation in (5, 6, 7, 8) else (h, w, alpha)


def output_source(uri: str, size: Tuple[int, int]) -> Optional[str]:
    """The input digest (sha256 hex) that output `uri` records, "" when it records none, or None
    when it is not a valid output: missing, not an image whose structure checks out, or not
    (H, W) = `size`."""
    fs, path = split_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with Image.open(io.BytesIO(read_bytes(uri))) as im:
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
    fs, path = split_uri(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while piece := f.read(DIGEST_READ_BYTES):
            digest.update(piece)
    return digest.hexdigest()


# ---- raw pixels in rows ----------------------------------------------------------------------------
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


def unpack(data: bytes, dtype: str, shape) -> np.ndarray:
    """Raw pixel bytes of a row (`tobytes()` of a C-contiguous array) -> an array of `shape`, `dtype` (read-only)."""
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# ---- encoding ---------------------------------------------------------------------------------------
def resize_alpha(alpha: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an HxW uint8 / uint16 alpha channel to (H, W), same dtype."""
    peak = np.iinfo(alpha.dtype).max
    resized = cv2.resize(alpha.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.rint(resized), 0, peak).astype(alpha.dtype)


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) from HxWxC uint16."""
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
    return (PNG_SIGNATURE + _png_chunk_bytes(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
            + _png_chunk_bytes(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESSION))
            + _png_chunk_bytes(b"IEND", b""))


def _png_chunk_bytes(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type `kind`, `data`, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with a chunk of type `kind` holding `data` right after its IHDR chunk."""
    return png[:PNG_IHDR_END] + _png_chunk_bytes(kind, data) + png[PNG_IHDR_END:]


def _with_iccp(png: bytes, icc_profile: bytes) -> bytes:
    """`png` with an iCCP chunk (the ICC profile, zlib-compressed) right after its IHDR chunk."""
    return _with_chunk(png, b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile))


def source_exif(source_digest: str) -> bytes:
    """An EXIF block (as Pillow takes it: `Exif`, two NULs, TIFF) recording an output's input digest."""
    block = Image.Exif()
    block[SOURCE_DIGEST_TAG] = SOURCE_DIGEST_PREFIX + source_digest
    return block.tobytes()


def encode_image(colour: np.ndarray, alpha: Optional[np.ndarray], ext: str,
                 icc_profile: Optional[bytes] = None, source_digest: str = "") -> bytes:
    """HxWxC (C = 1 or 3) uint8 / uint16 colour + optional HxW alpha -> file bytes of format `ext`.
    16 bits are kept in PNG; JPEG and WebP get 8 bits; JPEG drops alpha. `icc_profile` (the
    input's: the pixels are still in its colour space) is embedded in every format, and
    `source_digest` (the input's sha256, when given) as EXIF (`source_exif`)."""
    exif = source_exif(source_digest) if source_digest else b""
    if ext == ".png" and colour.dtype == np.uint16:
        channels = [colour] if alpha is None else [colour, alpha[..., None]]
        png = _png16(np.concatenate(channels, axis=2))
        png = _with_chunk(png, b"eXIf", exif[len(EXIF_HEADER):]) if exif else png
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
