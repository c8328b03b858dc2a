"""Hostile corpora and operators: what a real photo bucket brings to the jobs (issue 22, round 2)."""
import zlib

import pytest

from jobs import prepare_data as P
from pipeline import upscale_io as io
from pipeline.images import ImageTooLarge, load_image

PILLOW_BOMB_LIMIT = 178_956_970  # 2 x PIL.Image.MAX_IMAGE_PIXELS: what Pillow's own refusal quotes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, followed by data that is no image."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = b"IDAT" + b"\x00" * 16
    return b"".join([b"\x89PNG\r\n\x1a\n", (13).to_bytes(4, "big"), ihdr, zlib.crc32(ihdr).to_bytes(4, "big"),
                     (16).to_bytes(4, "big"), idat, zlib.crc32(idat).to_bytes(4, "big")])


# ---- limit messages name the project's own cap ----------------------------------------------------
DECLARED = [(10_000, 10_000), (20_000, 10_000), (100_000, 100_000)]  # 10^8, 2x10^8 (past Pillow's), 10^10


@pytest.mark.parametrize("width,height", DECLARED)
def test_limit_rows_quote_max_pixels_not_pillows_bomb_limit(tmp_path, width, height):
    data = png_header_only(width, height)
    with pytest.raises(ImageTooLarge) as raised:
        load_image(data, "big.png", max_pixels=40_000_000)
    assert "--max-pixels" in str(raised.value) and str(PILLOW_BOMB_LIMIT) not in str(raised.value)
    assert f"{width}x{height}" in str(raised.value)

    cfg = P.PrepareConfig(input=str(tmp_path), output=str(tmp_path / "out"), patch_size=32, max_pixels=40_000_000)
    rows, error = P.process_source(str(tmp_path / "big.png"), data, cfg)
    assert rows == [] and error["stage"] == "limit"
    assert "--max-pixels" in error["error"] and "40000000" in error["error"]
    assert str(PILLOW_BOMB_LIMIT) not in error["error"] and "decompression" not in error["error"].lower()

    (tmp_path / "big.png").write_bytes(data)
    probed = io.probe_batch({"input": [str(tmp_path / "big.png")], "output": [str(tmp_path / "o" / "big.png")]},
                            scale=4.0, max_pixels=50_000_000)
    assert probed["status"] == [io.ERROR]
    assert "--max-pixels" in probed["error"][0] and str(PILLOW_BOMB_LIMIT) not in probed["error"][0]
