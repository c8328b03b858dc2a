"""Real-ESRGAN second-order degradation, x4 (Wang et al. 2021, "Real-ESRGAN", Sec. 3).

The numbers are those of Real-ESRGAN's `train_realesrnet_x4plus.yml` (docs/DESIGN.md, "Degradation"):

    HR -> [blur k1 -> resize -> noise -> JPEG]            first order
       -> [blur k2 (p 0.8) -> resize -> noise]            second order
       -> {resize to 1/scale + sinc (p 0.8), JPEG} in random order -> LR

Drawing and applying are separate:

* `draw_params(rng, cfg)` is a pure function of a `numpy.random.Generator`; it returns a JSON-able
  dict of every drawn value (kernel families named as in Real-ESRGAN: iso, aniso,
  generalized_iso, generalized_aniso, plateau_iso, plateau_aniso, sinc). Each noise step records
  its own `noise_seed`, so the dict alone reproduces the noise realisation.
* `apply_degradation(hr, params)` is a pure function of the image and that dict.
* `degrade(hr, seed=, sample_id=)` derives the generator from `(seed, sample_id)` only, so the
  output does not depend on batch size, worker count or scheduling order.
* `degrade(..., kind="bicubic")` is the classical synthetic-SR degradation instead (antialiased
  bicubic x1/scale, as MATLAB's imresize; PIL's resampling): params `{"kind": "bicubic"}`.

Images are processed as float32 in [0, 1], BGR channel order internally (as BasicSR's OpenCV
functions assume, which matters for gray conversion and JPEG); blur uses `cv2.filter2D` with
reflect-101 borders (= torch's 'reflect' padding in BasicSR's `filter2D`), resizes use
`cv2.resize` ('area' = INTER_AREA, 'bilinear' = INTER_LINEAR, 'bicubic' = INTER_CUBIC).
Known deviation: Real-ESRGAN's torch 'area' upsampling is nearest-like, OpenCV's INTER_AREA
upsampling is bilinear-like; JPEG quality is drawn continuously and applied rounded, since
OpenCV's encoder takes an integer quality.

Speed (>= 3x BasicSR per core, see benchmarks/bench_degrade.py): rank-1 kernels run as two 1-D
passes, Gaussian noise is Box-Muller on float32 uniforms, and Poisson noise is drawn by inverse
CDF from cached per-level tables (the 8-bit image has at most 256 distinct rates). These draw
from the same distributions as BasicSR's NumPy calls, not the same realisations.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import cv2
import numpy as np
from PIL import Image
from scipy import special

from flowsr.seeds import seeded_rng

PARAMS_VERSION = 1
DEGRADATION_KINDS = ("realesrgan", "bicubic")

KERNEL_FAMILIES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                   "plateau_aniso")
SINC = "sinc"
RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
NOISE_KINDS = ("gaussian", "poisson")
FINAL_ORDERS = ("resize_then_jpeg", "jpeg_then_resize")

_CV2_INTERPOLATION = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR,
                      "bicubic": cv2.INTER_CUBIC}
_PIXEL_MAX = 255.0
_NOISE_SEED_BOUND = 2**63
_SEPARABLE_TOL = 1e-9  # s1/s0 below which a kernel is treated as rank 1
_GUIDE_BINS = 1024  # resolution of the Poisson sampler's guide table
_POISSON_TAIL_SIGMAS = 12  # the Poisson tables stop at lam + 12 sqrt(lam) + pad
_POISSON_TAIL_PAD = 24


def _check_probs(name: str, probs, n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0):
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {probs}")


@dataclass(frozen=True)
class StageConfig:
    """One degradation order (Real-ESRGAN's `*` or `*2` options)."""

    blur_sigma: Tuple[float, float]
    resize_prob: Tuple[float, float, float]  # up, down, keep
    resize_range: Tuple[float, float]
    noise_range: Tuple[float, float]  # Gaussian sigma, in 0..255 units
    poisson_scale_range: Tuple[float, float]
    kernel_list: Tuple[str, ...] = KERNEL_FAMILIES
    kernel_prob: Tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    betag_range: Tuple[float, float] = (0.5, 4.0)
    betap_range: Tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    gaussian_noise_prob: float = 0.5
    gray_noise_prob: float = 0.4
    jpeg_range: Tuple[float, float] = (30.0, 95.0)

    def __post_init__(self):
        _check_probs("kernel_prob", self.kernel_prob, len(self.kernel_list))
        _check_probs("resize_prob", self.resize_prob, len(RESIZE_DIRECTIONS))
        for name in self.kernel_list:
            if name not in KERNEL_FAMILIES:
                raise ValueError(f"unknown kernel family: {name!r}")
        for name in ("blur_sigma", "resize_range", "noise_range", "poisson_scale_range",
                     "betag_range", "betap_range", "jpeg_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if not self.resize_range[0] <= 1 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1, got {self.resize_range}")
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


FIRST_ORDER = StageConfig(blur_sigma=(0.2, 3.0), resize_prob=(0.2, 0.7, 0.1),
                          resize_range=(0.15, 1.5), noise_range=(1.0, 30.0),
                          poisson_scale_range=(0.05, 3.0))
SECOND_ORDER = StageConfig(blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3),
                           resize_range=(0.3, 1.2), noise_range=(1.0, 25.0),
                           poisson_scale_range=(0.05, 2.5))


@dataclass(frozen=True)
class DegradationConfig:
    """Every probability and range of the degradation; defaults = train_realesrnet_x4plus.yml."""

    stage1: StageConfig = FIRST_ORDER
    stage2: StageConfig = SECOND_ORDER
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_resize_first_prob: float = 0.5  # P(resize + sinc before the final JPEG)
    kernel_sizes: Tuple[int, ...] = tuple(range(7, 22, 2))
    rotation_range: Tuple[float, float] = (-math.pi, math.pi)
    # sinc cut-off omega_c: [pi/3, pi] for kernels < 13 px, [pi/5, pi] from 13 px (Real-ESRGAN)
    sinc_omega_small: Tuple[float, float] = (math.pi / 3, math.pi)
    sinc_omega_large: Tuple[float, float] = (math.pi / 5, math.pi)
    sinc_large_from: int = 13
    final_sinc_omega: Tuple[float, float] = (math.pi / 3, math.pi)
    resize_modes: Tuple[str, ...] = RESIZE_MODES

    def __post_init__(self):
        if not self.kernel_sizes or any(k < 3 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and >= 3, got {self.kernel_sizes}")
        for mode in self.resize_modes:
            if mode not in _CV2_INTERPOLATION:
                raise ValueError(f"unknown resize mode: {mode!r}")
        for name in ("second_blur_prob", "final_sinc_prob", "final_resize_first_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


REALESRGAN_X4 = DegradationConfig()


# ---------------------------------------------------------------------------------------------
# Drawing parameters (pure functions of a numpy Generator)
# ---------------------------------------------------------------------------------------------

def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """The generator of one sample, derived from `(seed, sample_id)` only."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError(f"sample_id must be a non-empty str, got {sample_id!r}")
    return seeded_rng(seed, sample_id)


def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _choice(rng: np.random.Generator, options, probs=None):
    """One of `options`, uniformly or with `probs` (inverse CDF of one uniform draw)."""
    if probs is None:
        return options[int(rng.integers(len(options)))]
    index = bisect.bisect_right(list(itertools.accumulate(probs)), rng.random())
    return options[min(index, len(options) - 1)]


def _draw_beta(rng: np.random.Generator, bounds) -> float:
    """Shape beta: below or above 1 with p 0.5 each (Real-ESRGAN's generalized/plateau draw)."""
    if rng.random() < 0.5:
        return _uniform(rng, (bounds[0], 1.0))
    return _uniform(rng, (1.0, bounds[1]))


def _draw_sinc(rng: np.random.Generator, size: int, omega: Tuple[float, float]) -> Dict[str, Any]:
    return {"family": SINC, "size": size, "omega_c": _uniform(rng, omega)}


def draw_kernel(rng: np.random.Generator, stage: StageConfig,
                cfg: DegradationConfig = REALESRGAN_X4) -> Dict[str, Any]:
    """One blur kernel's parameters: a sinc with p `sinc_prob`, else a mixed Gaussian family."""
    size = int(_choice(rng, cfg.kernel_sizes))
    if rng.random() < stage.sinc_prob:
        omega = cfg.sinc_omega_small if size < cfg.sinc_large_from else cfg.sinc_omega_large
        return _draw_sinc(rng, size, omega)
    family = _choice(rng, stage.kernel_list, stage.kernel_prob)
    sigma_x = _uniform(rng, stage.blur_sigma)
    sigma_y, rotation = sigma_x, 0.0
    if family.endswith("aniso"):
        sigma_y = _uniform(rng, stage.blur_sigma)
        rotation = _uniform(rng, cfg.rotation_range)
    kernel = {"family": family, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y,
              "rotation": rotation}
    if family.startswith("generalized"):
        kernel["beta"] = _draw_beta(rng, stage.betag_range)
    elif family.startswith("plateau"):
        kernel["beta"] = _draw_beta(rng, stage.betap_range)
    return kernel


def draw_resize(rng: np.random.Generator, stage: StageConfig,
                cfg: DegradationConfig = REALESRGAN_X4) -> Dict[str, Any]:
    """Resize direction (up/down/keep), factor and interpolation mode."""
    direction = _choice(rng, RESIZE_DIRECTIONS, stage.resize_prob)
    if direction == "up":
        factor = _uniform(rng, (1.0, stage.resize_range[1]))
    elif direction == "down":
        factor = _uniform(rng, (stage.resize_range[0], 1.0))
    else:
        factor = 1.0
    return {"direction": direction, "factor": factor, "mode": _choice(rng, cfg.resize_modes)}


def draw_noise(rng: np.random.Generator, stage: StageConfig) -> Dict[str, Any]:
    """Gaussian (sigma in 0..255 units) with p `gaussian_noise_prob`, else Poisson; gray or colour."""
    if rng.random() < stage.gaussian_noise_prob:
        noise = {"kind": "gaussian", "sigma": _uniform(rng, stage.noise_range)}
    else:
        noise = {"kind": "poisson", "scale": _uniform(rng, stage.poisson_scale_range)}
    noise["gray"] = bool(rng.random() < stage.gray_noise_prob)
    noise["noise_seed"] = int(rng.integers(_NOISE_SEED_BOUND))
    return noise


def draw_params(rng: np.random.Generator, cfg: DegradationConfig = REALESRGAN_X4) -> Dict[str, Any]:
    """Every random choice of one degradation, as a JSON-able dict (no image needed)."""
    stage1 = {"blur": draw_kernel(rng, cfg.stage1, cfg), "resize": draw_resize(rng, cfg.stage1, cfg),
              "noise": draw_noise(rng, cfg.stage1), "jpeg_quality": _uniform(rng, cfg.stage1.jpeg_range)}
    blur2 = draw_kernel(rng, cfg.stage2, cfg) if rng.random() < cfg.second_blur_prob else None
    stage2 = {"blur": blur2, "resize": draw_resize(rng, cfg.stage2, cfg),
              "noise": draw_noise(rng, cfg.stage2)}
    sinc = None
    if rng.random() < cfg.final_sinc_prob:
        sinc = _draw_sinc(rng, int(_choice(rng, cfg.kernel_sizes)), cfg.final_sinc_omega)
    final = {"order": FINAL_ORDERS[0] if rng.random() < cfg.final_resize_first_prob else FINAL_ORDERS[1],
             "resize_mode": _choice(rng, cfg.resize_modes), "sinc": sinc,
             "jpeg_quality": _uniform(rng, cfg.stage2.jpeg_range)}
    return {"version": PARAMS_VERSION, "stage1": stage1, "stage2": stage2, "final": final}


# ---------------------------------------------------------------------------------------------
# Kernels (BasicSR `degradations.py` formulas, vectorised)
# ---------------------------------------------------------------------------------------------

def _inverse_covariance(sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """inv(U diag(sx^2, sy^2) U^T) with U the rotation by `rotation` (2x2, float64)."""
    c, s = math.cos(rotation), math.sin(rotation)
    u = np.array([[c, -s], [s, c]])
    return u @ np.diag([1.0 / sigma_x**2, 1.0 / sigma_y**2]) @ u.T


def _quadratic_form(size: int, inv_cov: np.ndarray) -> np.ndarray:
    """x^T inv_cov x on the size x size grid centred at 0 (x = column offset, y = row offset)."""
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    return inv_cov[0, 0] * xx * xx + (inv_cov[0, 1] + inv_cov[1, 0]) * xx * yy + inv_cov[1, 1] * yy * yy


def sinc_kernel(omega_c: float, size: int) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel, cut-off `omega_c` rad/px; size x size float64, sum 1."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    radius = np.hypot(ax[None, :], ax[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = omega_c * special.j1(omega_c * radius) / (2 * np.pi * radius)
    kernel[size // 2, size // 2] = omega_c**2 / (4 * np.pi)
    return kernel / kernel.sum()


def make_kernel(params: Dict[str, Any]) -> np.ndarray:
    """The blur kernel named by `params` (from `draw_kernel`): size x size float64, sum 1."""
    family, size = params["family"], params["size"]
    if family == SINC:
        return sinc_kernel(params["omega_c"], size)
    q = _quadratic_form(size, _inverse_covariance(params["sigma_x"], params["sigma_y"],
                                                  params["rotation"]))
    if family in ("iso", "aniso"):
        kernel = np.exp(-0.5 * q)
    elif family in ("generalized_iso", "generalized_aniso"):
        kernel = np.exp(-0.5 * np.power(q, params["beta"]))
    elif family in ("plateau_iso", "plateau_aniso"):
        kernel = 1.0 / (np.power(q, params["beta"]) + 1.0)
    else:
        raise ValueError(f"unknown kernel family: {family!r}")
    return kernel / kernel.sum()


# ---------------------------------------------------------------------------------------------
# Applying (images: float32 HxWx3 in [0, 1], BGR)
# ---------------------------------------------------------------------------------------------

def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with `kernel`, reflect-101 borders; same shape and dtype.

    Rank-1 kernels (isotropic Gaussians) run as two 1-D passes, the rest through `cv2.filter2D`.
    """
    u, s, vt = np.linalg.svd(kernel)
    if s[1] <= _SEPARABLE_TOL * s[0]:
        return cv2.sepFilter2D(img, -1, (vt[0] * s[0]).astype(np.float32),
                               u[:, 0].astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize to height x width with 'area' / 'bilinear' / 'bicubic'; a no-op at the same size."""
    if mode not in _CV2_INTERPOLATION:
        raise ValueError(f"unknown resize mode: {mode!r}")
    height, width = max(int(height), 1), max(int(width), 1)
    if (height, width) == img.shape[:2]:
        return img
    return cv2.resize(img, (width, height), interpolation=_CV2_INTERPOLATION[mode])


def standard_normal(n: int, rng: np.random.Generator) -> np.ndarray:
    """n N(0, 1) draws, float32, by Box-Muller on float32 uniforms (|z| <= 5.8 by resolution)."""
    half = (n + 1) // 2
    radius = np.sqrt(np.float32(-2) * np.log(np.float32(1) - rng.random(half, dtype=np.float32)))
    angle = np.float32(2 * np.pi) * rng.random(half, dtype=np.float32)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def gaussian_noise(shape, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """N(0, (sigma/255)^2) noise, float32 of `shape` (HxWx3); one channel repeated when gray."""
    noise_shape = (*shape[:2], 1) if gray else tuple(shape)
    noise = standard_normal(math.prod(noise_shape), rng).reshape(noise_shape)
    return noise * np.float32(sigma / _PIXEL_MAX)


@functools.lru_cache(maxsize=None)
def _poisson_tables(vals: float) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF tables of Poisson(level / 255 * vals) for the 256 levels of an 8-bit image.

    Returns (cdf, guide): cdf float64 [256, K] (last column forced to 1), guide int32
    [256, G + 1] with guide[l, j] the smallest k such that cdf[l, k] > j / G (clamped to K - 1).
    """
    lam = np.arange(256) / _PIXEL_MAX * vals
    size = int(vals + _POISSON_TAIL_SIGMAS * math.sqrt(vals) + _POISSON_TAIL_PAD)
    k = np.arange(size)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = k * np.log(lam[:, None]) - lam[:, None] - special.gammaln(k + 1)
    pmf = np.exp(log_pmf)
    pmf[0] = 0.0
    pmf[0, 0] = 1.0  # level 0: lam = 0, all mass at k = 0
    cdf = np.cumsum(pmf, axis=1)
    cdf[:, -1] = 1.0
    grid = np.arange(_GUIDE_BINS + 1) / _GUIDE_BINS
    guide = np.stack([np.searchsorted(row, grid, side="right") for row in cdf])
    return cdf, np.minimum(guide, size - 1).astype(np.int32)


def _first_above(cdf_flat: np.ndarray, row_start: np.ndarray, u: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray) -> np.ndarray:
    """Smallest k in [lo, hi] with cdf[row, k] > u, by vectorised bisection (cdf[row, hi] > u)."""
    for _ in range(int(np.max(hi - lo)).bit_length()):
        mid = (lo + hi) // 2
        above = cdf_flat[row_start + mid] > u
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid + 1)
    return lo


def poisson_counts(levels: np.ndarray, vals: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(levels / 255 * vals) draws for uint8 `levels`, int32 of the same shape.

    Exact inverse-CDF sampling (guide table, then bisection inside the few ambiguous bins);
    several times faster than `Generator.poisson` on per-pixel rates.
    """
    cdf, guide = _poisson_tables(float(vals))
    level = levels.ravel().astype(np.int32)
    u = rng.random(level.size)
    cell = level * (_GUIDE_BINS + 1) + (u * _GUIDE_BINS).astype(np.int32)
    guide_flat = guide.ravel()
    lo = guide_flat[cell]
    todo = np.flatnonzero(lo != guide_flat[cell + 1])
    if todo.size:
        lo[todo] = _first_above(cdf.ravel(), level[todo] * cdf.shape[1], u[todo], lo[todo],
                                guide_flat[cell[todo] + 1])
    return lo.reshape(levels.shape)


def poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN's Poisson noise of `img` (float32 HxWx3 BGR in [0, 1]), times `scale`.

    The image (or its luma when gray) is quantised to 8 bits; the photon count per unit is the
    number of distinct levels rounded up to a power of two. Returns float32 HxWx3 (HxWx1 if gray).
    """
    base = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img
    levels = np.clip(np.rint(base * _PIXEL_MAX), 0, _PIXEL_MAX).astype(np.uint8)
    n_levels = np.count_nonzero(np.bincount(levels.ravel(), minlength=256))
    vals = 2.0 ** math.ceil(math.log2(max(n_levels, 1)))
    quantised = levels.astype(np.float32) * np.float32(1 / _PIXEL_MAX)
    counts = poisson_counts(levels, vals, rng)
    noise = (counts.astype(np.float32) * np.float32(1 / vals) - quantised) * np.float32(scale)
    return noise[..., None] if gray else noise


def add_noise(img: np.ndarray, noise: Dict[str, Any]) -> np.ndarray:
    """Add the noise described by `noise` (from `draw_noise`) and clip to [0, 1]."""
    rng = seeded_rng(noise["noise_seed"])
    if noise["kind"] == "gaussian":
        delta = gaussian_noise(img.shape, noise["sigma"], noise["gray"], rng)
    elif noise["kind"] == "poisson":
        delta = poisson_noise(img, noise["scale"], noise["gray"], rng)
    else:
        raise ValueError(f"unknown noise kind: {noise['kind']!r}")
    out = img + delta
    return np.clip(out, 0.0, 1.0, out=out)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    """JPEG round trip at `quality` (rounded to an int in 0..100) of a float32 BGR image."""
    pixels = np.clip(img * _PIXEL_MAX + 0.5, 0, _PIXEL_MAX).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(round(quality))])
    if not ok:
        raise RuntimeError("OpenCV JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) * np.float32(1 / _PIXEL_MAX)


def _resize_and_sinc(img: np.ndarray, height: int, width: int, final: Dict[str, Any]) -> np.ndarray:
    img = resize(img, height, width, final["resize_mode"])
    return blur(img, make_kernel(final["sinc"])) if final["sinc"] is not None else img


def apply_degradation(hr: np.ndarray, params: Dict[str, Any]) -> np.ndarray:
    """Degrade `hr` (uint8 HxWx3 RGB, H and W divisible by params['scale']) with `params`.

    Returns uint8 (H/scale)x(W/scale)x3 RGB. Deterministic given (hr, params).
    """
    scale = params["scale"]
    _check_hr(hr, scale)
    height, width = hr.shape[:2]
    kind = params.get("kind", "realesrgan")
    if kind == "bicubic":
        return np.asarray(Image.fromarray(hr).resize((width // scale, height // scale), Image.BICUBIC))
    if kind != "realesrgan":
        raise ValueError(f"unknown degradation kind: {kind!r} (choose from {', '.join(DEGRADATION_KINDS)})")
    img = np.ascontiguousarray(hr[..., ::-1]).astype(np.float32) * np.float32(1 / _PIXEL_MAX)

    s1 = params["stage1"]
    img = blur(img, make_kernel(s1["blur"]))
    factor = s1["resize"]["factor"]
    img = resize(img, int(height * factor), int(width * factor), s1["resize"]["mode"])
    img = jpeg(add_noise(img, s1["noise"]), s1["jpeg_quality"])

    s2 = params["stage2"]
    if s2["blur"] is not None:
        img = blur(img, make_kernel(s2["blur"]))
    factor = s2["resize"]["factor"]
    img = resize(img, int(height / scale * factor), int(width / scale * factor),
                 s2["resize"]["mode"])
    img = add_noise(img, s2["noise"])

    final = params["final"]
    lr_h, lr_w = height // scale, width // scale
    if final["order"] == FINAL_ORDERS[0]:
        img = jpeg(_resize_and_sinc(img, lr_h, lr_w, final), final["jpeg_quality"])
    elif final["order"] == FINAL_ORDERS[1]:
        img = _resize_and_sinc(jpeg(img, final["jpeg_quality"]), lr_h, lr_w, final)
    else:
        raise ValueError(f"unknown final order: {final['order']!r}")
    lr = np.clip(img * _PIXEL_MAX + 0.5, 0, _PIXEL_MAX).astype(np.uint8)
    return np.ascontiguousarray(lr[..., ::-1])


def _check_hr(hr: np.ndarray, scale: int) -> None:
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"hr must be uint8 HxWx3, got {getattr(hr, 'dtype', type(hr))} "
                         f"{getattr(hr, 'shape', '')}")
    if hr.shape[0] % scale or hr.shape[1] % scale:
        raise ValueError(f"hr size {hr.shape[:2]} is not divisible by scale {scale}")


def degrade(hr: np.ndarray, *, seed: int, sample_id: str, scale: int = 4,
            cfg: DegradationConfig = REALESRGAN_X4, kind: str = "realesrgan") -> Tuple[np.ndarray, Dict[str, Any]]:
    """Real-ESRGAN second-order degradation of one HR patch, seeded by `(seed, sample_id)`
    (`kind="bicubic"`: bicubic downsampling, nothing drawn).

    hr: uint8 HxWx3 RGB, H and W divisible by `scale`.
    Returns (lr, params): lr uint8 (H/scale)x(W/scale)x3 RGB; params a JSON-able dict of every
    drawn value (see `draw_params`) plus `scale`.
    """
    _check_hr(hr, scale)
    rng = sample_rng(seed, sample_id)  # validates both
    if kind == "realesrgan":
        params = {**draw_params(rng, cfg), "scale": int(scale)}
    else:
        params = {"version": PARAMS_VERSION, "kind": kind, "scale": int(scale)}
    return apply_degradation(hr, params), params
