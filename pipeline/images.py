"""Robust image decoding for the data stage and the bulk upscaler.

`load_image(bytes)` decodes anything Pillow reads (plus 16-bit colour PNG/TIFF through OpenCV,
which Pillow would silently reduce to 8 bits), applies the EXIF orientation, and keeps the
source's pixel format: HxW or HxWxC, uint8 or uint16. `to_rgb8` then converts that to the one
format the pipeline uses — uint8 HxWx3 RGB — and says in words what it changed.

Undecodable, truncated or unsupported data raises `ImageDecodeError` with the reason.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

EXIF_ORIENTATION_TAG = 0x0112
TIFF_BITS_PER_SAMPLE_TAG = 258
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_BIT_DEPTH_OFFSET = 24  # signature (8) + IHDR length (4) + type (4) + width (4) + height (4)
ALPHA_MODES = ("white", "drop")
_WHITE = 255.0
_UINT16_TO_UINT8 = 257  # 65535 / 255

# Pillow modes that convert losslessly (or by their definition) to RGB / RGBA arrays.
_TO_RGB = {"RGB": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
           "RGBX": "RGB", "RGBa": "RGBA", "RGBA": "RGBA", "PA": "RGBA", "La": "LA",
           "LA": "LA", "L": "L", "1": "L"}
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


class ImageTooLarge(ImageDecodeError):
    """The header declares more pixels than allowed; nothing was decoded."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image in its source format.

    pixels: HxW (gray), HxWx2 (gray + alpha), HxWx3 (RGB) or HxWx4 (RGBA); uint8 or uint16.
    """

    pixels: np.ndarray
    mode: str  # the source's Pillow mode, e.g. "RGB", "P", "CMYK", "I;16"
    format: str  # e.g. "PNG", "JPEG"
    bit_depth: int  # 8 or 16
    has_alpha: bool
    orientation: int  # the EXIF orientation that was applied (1 = none)
    icc_profile: Optional[bytes] = None  # the embedded ICC profile, kept for the output (None: none)

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an HxW[xC] array as EXIF orientation 1-8 prescribes (= ImageOps.exif_transpose)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    if orientation not in ops:
        return pixels  # invalid tag values are ignored, as Pillow does
    return np.ascontiguousarray(ops[orientation](pixels))


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not discard a decodable image
        return 1


def _is_sixteen_bit_colour(data: bytes, im: Image.Image) -> bool:
    """True for 16-bit-per-channel colour PNG/TIFF, which Pillow decodes to 8 bits."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG" and data[:8] == PNG_SIGNATURE and len(data) > PNG_BIT_DEPTH_OFFSET:
        return data[PNG_BIT_DEPTH_OFFSET] == 16
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(TIFF_BITS_PER_SAMPLE_TAG, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits) == 16
    return False


def _decode_sixteen_bit_colour(data: bytes, uri: str) -> np.ndarray:
    """OpenCV decode of a 16-bit colour file -> uint16 HxWx3 RGB or HxWx4 RGBA."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3:
        raise ImageDecodeError(f"{uri or '<bytes>'}: cannot decode 16-bit colour image")
    code = cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(pixels, code)


def _pil_pixels(im: Image.Image, uri: str) -> np.ndarray:
    """Pillow image -> array in the closest of L / LA / RGB / RGBA (uint8) or I;16 (uint16)."""
    mode = im.mode
    if mode == "P":
        target = "RGBA" if "transparency" in im.info else "RGB"
        return np.asarray(im.convert(target))
    if mode in _SIXTEEN_BIT_GRAY:
        gray = np.asarray(im)
        if mode == "I":  # 32-bit int container (some 16-bit PNG/TIFF readers); clamp to 16 bits
            gray = np.clip(gray, 0, np.iinfo(np.uint16).max)
        return gray.astype(np.uint16)
    if mode in _TO_RGB:
        target = _TO_RGB[mode]
        return np.asarray(im if mode == target else im.convert(target))
    raise ImageDecodeError(f"{uri or '<bytes>'}: unsupported image mode {mode!r}")


def open_header(fp) -> Image.Image:
    """`Image.open(fp)` (the header only), except that an image past Pillow's decompression-bomb
    limit is opened all the same: for callers that check the header's size against a cap of
    their own (`--max-pixels`), which is then the limit that applies and the one a message names.
    `fp`: a binary file object at its start."""
    try:
        return Image.open(fp)
    except Image.DecompressionBombError:
        pass
    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for name in Image.ID:  # as Image.open finds the format, without its size check
        factory, accept = Image.OPEN[name]
        if accept and not accept(prefix):
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError):
            continue
    raise UnidentifiedImageError("cannot identify image file")


def too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    """The message for a header of `width` x `height` over the `max_pixels` cap."""
    return (f"too many pixels: the header declares {width}x{height} = {width * height} pixels, over the cap of "
            f"{max_pixels} (--max-pixels)")


def load_image(data: bytes, uri: str = "", max_pixels: Optional[int] = None) -> DecodedImage:
    """Decode image bytes (first frame of animations), EXIF orientation applied.

    `max_pixels`: checked against the size in the header before any pixel is decoded
    (ImageTooLarge); it replaces Pillow's decompression-bomb limit, which applies only when no
    cap is given. Raises ImageDecodeError for empty, unrecognised, truncated, oversized or
    unsupported data.
    """
    name = uri or "<bytes>"
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data)) if max_pixels is None else open_header(io.BytesIO(data))
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(too_many_pixels(width, height, max_pixels))
        im.load()
    except ImageTooLarge:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"too many pixels: past Pillow's decompression-bomb limit ({exc})") from exc
    except Exception as exc:  # truncated or corrupt streams raise OSError, SyntaxError, zlib.error...
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc})") from exc
    mode, orientation = im.mode, _exif_orientation(im)
    if _is_sixteen_bit_colour(data, im):
        pixels, bit_depth = _decode_sixteen_bit_colour(data, uri), 16
    else:
        pixels = _pil_pixels(im, uri)
        bit_depth = 16 if pixels.dtype == np.uint16 else 8
    if pixels.size == 0:
        raise ImageDecodeError(f"{name}: image has no pixels")
    has_alpha = pixels.ndim == 3 and pixels.shape[2] in (2, 4)
    return DecodedImage(pixels=apply_orientation(pixels, orientation), mode=mode,
                        format=im.format or "", bit_depth=bit_depth, has_alpha=has_alpha,
                        orientation=orientation, icc_profile=im.info.get("icc_profile") or None)


def _to_eight_bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by rounding x / 257 (so 65535 -> 255)."""
    return ((pixels.astype(np.uint32) + _UINT16_TO_UINT8 // 2) // _UINT16_TO_UINT8).astype(np.uint8)


def _composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour uint8 HxWx3, alpha uint8 HxW -> uint8 HxWx3 over a white background."""
    a = alpha.astype(np.float32)[..., None] * np.float32(1 / _WHITE)
    out = colour.astype(np.float32) * a + np.float32(_WHITE) * (1 - a)
    return np.clip(out + 0.5, 0, _WHITE).astype(np.uint8)


def to_rgb8(img: DecodedImage, *, alpha: str = "white") -> Tuple[np.ndarray, str]:
    """Convert a decoded image to uint8 HxWx3 RGB.

    alpha: "white" composites transparent pixels on white, "drop" discards the alpha channel
    (a fully opaque alpha is always just dropped).
    Returns (rgb, conversion): `conversion` lists every change in words, "" when none.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"unknown alpha mode: {alpha!r}")
    pixels, notes = img.pixels, []
    if img.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "1"):
        notes.append(f"mode {img.mode} -> RGB")
    if img.orientation != 1:
        notes.append(f"EXIF orientation {img.orientation} applied")
    if pixels.dtype == np.uint16:
        pixels = _to_eight_bit(pixels)
        notes.append("16-bit -> 8-bit")
    elif pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    if pixels.ndim == 2 or pixels.shape[2] == 2:
        colour = pixels if pixels.ndim == 2 else pixels[..., 0]
        pixels = np.concatenate([np.repeat(colour[..., None], 3, axis=2)]
                                + ([pixels[..., 1:]] if pixels.ndim == 3 else []), axis=2)
        notes.append("gray -> RGB")
    if pixels.shape[2] == 4:
        colour, alpha_channel = pixels[..., :3], pixels[..., 3]
        if alpha_channel.min() == np.iinfo(np.uint8).max:
            notes.append("opaque alpha dropped")
            pixels = colour
        elif alpha == "white":
            notes.append("alpha composited on white")
            pixels = _composite_on_white(colour, alpha_channel)
        else:
            notes.append("alpha dropped")
            pixels = colour
    if pixels.shape[2] != 3:
        raise ValueError(f"cannot convert {pixels.shape[2]} channels to RGB")
    return np.ascontiguousarray(pixels), "; ".join(notes)
