"""Template captions: a negative quality caption of an LR image from the degradation parameters
recorded in its row (`pipeline.degrade`'s params layout), and the fixed positive one of its HR
image. Deterministic and model-free: the offline stand-in for Qwen2-VL's captions (Eq. 9).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Effective blur sigma, in LR pixels: (slightly soft, blurry, heavily blurred) from these up.
BLUR_LEVELS = (0.25, 0.5, 0.8)
# Noise std at LR resolution, 0..255 units (see strongest_noise): slight / visible / strong.
NOISE_LEVELS = (3.0, 8.0, 18.0)
POISSON_TO_SIGMA = 11.3  # std of Real-ESRGAN Poisson noise at mid-gray, 256 levels, per unit scale
# JPEG quality below these: mild / visible / heavy compression artifacts.
JPEG_LEVELS = (80.0, 60.0, 40.0)
# Fraction of LR resolution the image passed through: lost fine detail / lost much detail.
RESOLUTION_LEVELS = (0.85, 0.55)
SINC_RINGING_OMEGA = 0.5 * math.pi  # sinc cut-offs below this leave visible ringing
# Summed levels of all defects -> overall rating (about a third of Real-ESRGAN draws each).
OVERALL_LEVELS = ((8, "very poor"), (6, "poor"), (0, "mediocre"))

TEMPLATES: Dict[str, Dict[str, Any]] = {
    "v1": {
        "hr": "image quality is excellent, sharp and clean, with clear details and natural colors.",
        "blur": ("slightly soft", "blurry", "heavily blurred"),
        "noise": ("slight", "visible", "strong"),
        "jpeg": ("mild JPEG artifacts", "visible JPEG compression artifacts",
                 "heavy JPEG compression artifacts"),
        "resolution": ("lacking fine detail", "missing most fine detail"),
        "ringing": "ringing around edges",
        "unknown": "image quality is poor, low-resolution and degraded.",
    },
}


def _level(value: float, thresholds: Sequence[float], ascending: bool = True) -> int:
    """0 below the first threshold, i when past the i-th (descending thresholds: below it)."""
    passed = [value >= t if ascending else value < t for t in thresholds]
    return sum(passed)


def _gaussian_blurs(params: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    out = []
    for stage in ("stage1", "stage2"):
        kernel = (params.get(stage) or {}).get("blur")
        if isinstance(kernel, dict) and "sigma_x" in kernel:
            out.append((stage, kernel))
    return out


def effective_blur(params: Dict[str, Any]) -> float:
    """Blur sigma in LR pixels: stage-1 sigma / scale and stage-2 sigma / (scale * stage-1 resize),
    combined in quadrature (each kernel's larger sigma)."""
    scale = float(params.get("scale") or 4)
    factor1 = float(((params.get("stage1") or {}).get("resize") or {}).get("factor") or 1.0)
    pixels_per_lr = {"stage1": scale, "stage2": scale * factor1}
    total = 0.0
    for stage, kernel in _gaussian_blurs(params):
        sigma = max(float(kernel.get("sigma_x") or 0), float(kernel.get("sigma_y") or 0))
        total += (sigma / pixels_per_lr[stage]) ** 2
    return math.sqrt(total)


def resolution_fraction(params: Dict[str, Any]) -> float:
    """Smallest size the image passed through, as a fraction of the final LR size (<= 1)."""
    scale = float(params.get("scale") or 4)
    factor1 = ((params.get("stage1") or {}).get("resize") or {}).get("factor")
    factor2 = ((params.get("stage2") or {}).get("resize") or {}).get("factor")
    sizes = [1.0]
    if factor1 is not None:
        sizes.append(scale * float(factor1))
    if factor1 is not None and factor2 is not None:
        sizes.append(float(factor2))
    return min(sizes)


def strongest_noise(params: Dict[str, Any]) -> Optional[Tuple[float, str, bool]]:
    """(std at LR resolution in 0..255 units, kind, gray) of the stronger noise step, or None.

    Stage-1 noise is added at `scale * factor1` pixels per LR pixel; the later downscale averages
    it, dividing its std by that ratio (when above 1). Poisson scales use POISSON_TO_SIGMA.
    """
    scale = float(params.get("scale") or 4)
    factor1 = float(((params.get("stage1") or {}).get("resize") or {}).get("factor") or 1.0)
    reduction = {"stage1": max(1.0, scale * factor1), "stage2": 1.0}
    best = None
    for stage in ("stage1", "stage2"):
        noise = (params.get(stage) or {}).get("noise")
        if not isinstance(noise, dict):
            continue
        kind = noise.get("kind")
        if kind == "gaussian" and noise.get("sigma") is not None:
            std = float(noise["sigma"])
        elif kind == "poisson" and noise.get("scale") is not None:
            std = float(noise["scale"]) * POISSON_TO_SIGMA
        else:
            continue
        std /= reduction[stage]
        if best is None or std > best[0]:
            best = (std, kind, bool(noise.get("gray", False)))
    return best


def lowest_jpeg_quality(params: Dict[str, Any]) -> Optional[float]:
    qualities = [(params.get(key) or {}).get("jpeg_quality") for key in ("stage1", "final")]
    qualities = [float(q) for q in qualities if q is not None]
    return min(qualities) if qualities else None


def has_ringing(params: Dict[str, Any]) -> bool:
    kernels = [(params.get(s) or {}).get("blur") for s in ("stage1", "stage2")]
    kernels.append((params.get("final") or {}).get("sinc"))
    return any(isinstance(k, dict) and k.get("family") == "sinc"
               and float(k.get("omega_c", math.pi)) < SINC_RINGING_OMEGA for k in kernels)


def template_lr_caption(params: Optional[Dict[str, Any]], version: str = "v1") -> str:
    """Negative quality caption of an LR image from its degradation params (pipeline.degrade).

    Deterministic; missing keys are skipped; no params at all gives a generic negative caption.
    """
    words = TEMPLATES[version]
    if not params:
        return words["unknown"]
    adjectives, defects, severity = ["low-resolution"], [], 0

    blur = _level(effective_blur(params), BLUR_LEVELS)
    if blur:
        adjectives.append(words["blur"][blur - 1])
        severity += blur
    resolution = _level(resolution_fraction(params), RESOLUTION_LEVELS, ascending=False)
    if resolution:
        adjectives.append(words["resolution"][resolution - 1])
        severity += resolution
    noise = strongest_noise(params)
    if noise is not None and _level(noise[0], NOISE_LEVELS):
        level = _level(noise[0], NOISE_LEVELS)
        defects.append(f"{words['noise'][level - 1]} {noise[1]} {'gray' if noise[2] else 'color'} noise")
        severity += level
    quality = lowest_jpeg_quality(params)
    if quality is not None and _level(quality, JPEG_LEVELS, ascending=False):
        level = _level(quality, JPEG_LEVELS, ascending=False)
        defects.append(words["jpeg"][level - 1])
        severity += level
    if has_ringing(params):
        defects.append(words["ringing"])
        severity += 1

    overall = next(name for bound, name in OVERALL_LEVELS if severity >= bound)
    caption = f"image quality is {overall}, {_join(adjectives)}"
    return caption + (f", with {_join(defects)}." if defects else ".")


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def parse_degradation(value) -> Optional[Dict[str, Any]]:
    """The `degradation` column (JSON string, bytes or None) as a dict, or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    if isinstance(value, str):
        if not value.strip():
            return None
        value = json.loads(value)
    return value if isinstance(value, dict) else None
