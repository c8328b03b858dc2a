"""Training-batch preparation: Parquet rows of PNG bytes -> model batches (pure torch, no Ray).

A row batch is what `ray.data` hands a worker (`iter_batches(batch_format="numpy")`): a dict of
equal-length arrays with at least `sample_id`, `hr` and `lr` (PNG bytes, see `pipeline/schema.py`)
and optionally `hr_caption` / `lr_caption`. `collate` turns it into the batch contract of
`flowsr.train_step`:

    hr, lr        float32 (B, 3, P, P) in [-1, 1]; P = data.patch_size; LR bicubic-upsampled to P
    hr_caption    list of B str (empty string when missing)
    lr_caption    list of B str

Augmentation (paired random crop + paired horizontal flip) draws from one `torch.Generator` per
sample, seeded from `(seed, sample_id, epoch)`, so a sample's crop does not depend on batch
size, worker count or reading order.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .config import DataConfig
from .sample import resize_to
from .seeds import seeded_generator
from .upscaler import array_to_tensor


def sample_generator(seed: int, sample_id: str, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from the first 63 bits of sha1(seed|sample_id|epoch)."""
    return seeded_generator(seed, sample_id, epoch)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    return array_to_tensor(image)[0]


def crop_origin(lr_hw: Tuple[int, int], lr_patch: int, generator: Optional[torch.Generator]) -> Tuple[int, int]:
    """Top-left (y, x) of an `lr_patch` crop in an LR image of size `lr_hw`: uniform when a
    generator is given, centred otherwise."""
    h, w = lr_hw
    if h < lr_patch or w < lr_patch:
        raise ValueError(f"LR image {h}x{w} is smaller than the LR patch {lr_patch}")
    if generator is None:
        return (h - lr_patch) // 2, (w - lr_patch) // 2
    y = int(torch.randint(0, h - lr_patch + 1, (1,), generator=generator))
    x = int(torch.randint(0, w - lr_patch + 1, (1,), generator=generator))
    return y, x


def paired_crop(hr: torch.Tensor, lr: torch.Tensor, patch_size: int, scale: int,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: HR (C, P, P) and LR (C, P/scale, P/scale), the LR crop at the HR crop's
    origin divided by `scale`. HR must be exactly `scale` times the LR size. Random with a
    generator, centred without."""
    if patch_size % scale:
        raise ValueError(f"patch_size={patch_size} must be a multiple of scale={scale}")
    if tuple(hr.shape[-2:]) != (lr.shape[-2] * scale, lr.shape[-1] * scale):
        raise ValueError(f"HR {tuple(hr.shape[-2:])} is not {scale}x LR {tuple(lr.shape[-2:])}")
    p = patch_size // scale
    y, x = crop_origin(tuple(lr.shape[-2:]), p, generator)
    hr_crop = hr[..., y * scale:(y + p) * scale, x * scale:(x + p) * scale]
    return hr_crop, lr[..., y:y + p, x:x + p]


def paired_hflip(hr: torch.Tensor, lr: torch.Tensor, generator: torch.Generator, p: float = 0.5):
    """Flip HR and LR together along the width with probability `p`."""
    if float(torch.rand((), generator=generator)) < p:
        return hr.flip(-1), lr.flip(-1)
    return hr, lr


def decode_rgb(data) -> np.ndarray:
    """Encoded image bytes (the shards' PNG columns: bytes, or Hugging Face `datasets`' image
    struct {"bytes", "path"}) -> uint8 HxWx3 RGB."""
    import io

    from PIL import Image

    data = data["bytes"] if isinstance(data, dict) else data
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def prepare_pair(hr_png: bytes, lr_png: bytes, cfg: DataConfig,
                 generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode one pair, crop (random with a generator, centred without), flip (training only).
    Returns HR float32 (3, P, P) and LR float32 (3, P/scale, P/scale), both in [-1, 1]."""
    hr, lr = to_tensor(decode_rgb(hr_png)), to_tensor(decode_rgb(lr_png))
    hr, lr = paired_crop(hr, lr, cfg.patch_size, cfg.scale, generator)
    if generator is not None and cfg.hflip:
        hr, lr = paired_hflip(hr, lr, generator)
    return hr, lr


def _captions(rows: Dict, key: str, n: int) -> List[str]:
    values = rows.get(key)
    if values is None:
        return [""] * n
    return [str(v) if v is not None else "" for v in values]


def collate(rows: Dict, cfg: DataConfig, *, seed: int = 0, epoch: int = 0, augment: bool = True,
            device=None) -> Dict:
    """A row batch (dict of arrays, see the module docstring) -> the training batch dict.
    `augment=False` gives centred crops without flips (validation)."""
    ids = [str(s) for s in rows["sample_id"]]
    pairs = [prepare_pair(h, l, cfg, sample_generator(seed, sid, epoch) if augment else None)
             for h, l, sid in zip(rows["hr"], rows["lr"], ids)]
    if not pairs:
        raise ValueError("empty row batch")
    hr, lr = torch.stack([h for h, _ in pairs]), torch.stack([l for _, l in pairs])
    if device is not None:
        hr, lr = hr.to(device), lr.to(device)
    lr = resize_to(lr, hr.shape[-2:])  # on the target device: bicubic at the HR size
    return {"hr": hr, "lr": lr, "hr_caption": _captions(rows, "hr_caption", len(ids)),
            "lr_caption": _captions(rows, "lr_caption", len(ids)), "sample_id": ids}


TRAIN_COLUMNS = ("sample_id", "hr", "lr", "hr_caption", "lr_caption")
