"""Image-quality metrics of SR papers: PSNR / SSIM on Y (BasicSR), and the learned suite (pyiqa).

PSNR and SSIM follow BasicSR's `calculate_psnr` / `calculate_ssim` with `test_y_channel=True`
exactly: the Y channel of ITU-R BT.601 (16-235 range, BasicSR's `bgr2ycbcr(y_only=True)`,
computed in float32 as `to_y_channel` does), a border of `crop_border` pixels (= the scale)
removed, the mean squared error / the SSIM map in float64, SSIM with an 11x11 Gaussian window
(sigma 1.5) over the valid region, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2. They are written
here because the libraries differ in details that move the numbers: pyiqa's PSNR works in float32
on [0, 1] with an eps added to the MSE, torchmetrics' SSIM pads instead of keeping the valid
region. `tests/test_metrics.py` checks both against scikit-image and against BasicSR itself.

LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA and CLIPIQA come from pyiqa, the library SR papers use
(`pyiqa.create_metric`). Their weights are downloaded files; `MetricSuite` never downloads
unless asked (`allow_download=True`): a missing file makes the metric *unavailable*, with the
file and its URL as the reason, and the suite reports it so. Nothing is estimated and no metric
runs with random weights. Checking the caches costs only building the architectures: every
download hook (torch.hub, pyiqa, openai-clip, Hugging Face) raises at once instead of retrying.

Images are uint8 HxWx3 RGB arrays unless stated otherwise.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Dict, Iterator, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

# ---- BasicSR definitions ---------------------------------------------------------------------
Y_WEIGHTS_RGB = (65.481, 128.553, 24.966)  # BT.601 Y from RGB in [0, 1], BasicSR's bgr2ycbcr reversed
Y_OFFSET = 16.0
PIXEL_MAX = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 255] float) HxWx3 RGB -> float32 HxW Y in [16, 235], as BasicSR's
    `to_y_channel` (float32 [0, 1] -> BT.601 Y -> /255 in float32 -> x255)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected HxWx3 RGB, got shape {image.shape}")
    x = image.astype(np.float32) / 255.0
    y = np.dot(x, np.asarray(Y_WEIGHTS_RGB)) + Y_OFFSET  # float64, as np.dot with a list in BasicSR
    return (y / 255.0).astype(np.float32) * np.float32(255.0)


def crop_border(image: np.ndarray, border: int) -> np.ndarray:
    """Remove `border` pixels from each side of the first two axes."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return image
    if min(image.shape[:2]) <= 2 * border:
        raise ValueError(f"image {image.shape[:2]} is too small for a border of {border}")
    return image[border:-border, border:-border, ...]


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """PSNR (dB) on the Y channel, `border` pixels cropped (BasicSR `calculate_psnr`,
    test_y_channel=True). inf for identical images."""
    _check_pair(sr, hr)
    a = crop_border(rgb_to_y(sr), border).astype(np.float64)
    b = crop_border(rgb_to_y(hr), border).astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(PIXEL_MAX ** 2 / mse))


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian, as `cv2.getGaussianKernel(size, sigma)` for sigma > 0."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """2-D separable correlation with `k` x `k`, keeping only the valid region (no padding)."""
    r = len(k) // 2
    out = ndimage.correlate1d(ndimage.correlate1d(x, k, axis=0, mode="reflect"), k, axis=1, mode="reflect")
    return out[r:-r, r:-r]


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two float64 HxW images in [0, 255] over the valid region (BasicSR `_ssim`)."""
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape}")
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    k = gaussian_window_1d()
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a ** 2
    var_b = _filter_valid(b * b, k) - mu_b ** 2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int = 4) -> float:
    """SSIM on the Y channel, `border` pixels cropped (BasicSR `calculate_ssim`,
    test_y_channel=True)."""
    _check_pair(sr, hr)
    a = crop_border(rgb_to_y(sr), border).astype(np.float64)
    b = crop_border(rgb_to_y(hr), border).astype(np.float64)
    return float(ssim_map(a, b).mean())


# ---- the learned suite (pyiqa) -----------------------------------------------------------------
PAPER_METRICS = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa")
LEARNED_METRICS = PAPER_METRICS[2:]
LOWER_BETTER = frozenset({"lpips", "dists", "fid", "niqe"})
# pyiqa names; LPIPS (AlexNet, v0.1) and MUSIQ (KonIQ) as in the OSEDiff / SeeSR evaluation scripts
PYIQA_NAMES = {"lpips": "lpips", "dists": "dists", "fid": "fid", "niqe": "niqe", "musiq": "musiq",
               "maniqa": "maniqa-pipal", "clipiqa": "clipiqa"}
FULL_REFERENCE = frozenset({"lpips", "dists"})
NO_REFERENCE = frozenset({"niqe", "musiq", "maniqa", "clipiqa"})
SET_METRICS = frozenset({"fid"})  # computed over folders of images, not per image


class WeightsUnavailable(RuntimeError):
    """A metric's weight file is not cached and downloads are off."""


def _refuse(url, dst=None, *args, **kwargs):
    where = f" (expected at {dst})" if isinstance(dst, str) else ""
    raise WeightsUnavailable(f"weights not cached: {url}{where}; downloads are off "
                             "(place the file there, or allow downloads where there is network)")


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Make every download hook the metric libraries use fail at once: torch.hub (torchvision
    weights), pyiqa's URL and Google-Drive loaders, openai-clip's `_download` (when the file
    is missing) and the Hugging Face hub (offline mode, read at call time)."""
    import torch.hub

    patches = [(torch.hub, "download_url_to_file", _refuse)]
    try:
        import pyiqa.utils.download_util as pyiqa_dl
        patches += [(pyiqa_dl, "download_url_to_file", _refuse),
                    (pyiqa_dl, "download_file_from_google_drive", _refuse)]
    except ImportError:
        pass
    try:
        import clip.clip as openai_clip
        original = openai_clip._download

        def cached_only(url, root):
            path = os.path.join(root, os.path.basename(url))
            if not os.path.isfile(path):
                _refuse(url, path)
            return original(url, root)
        patches.append((openai_clip, "_download", cached_only))
    except ImportError:
        pass
    try:
        import huggingface_hub.constants as hf_constants
        patches.append((hf_constants, "HF_HUB_OFFLINE", True))
    except ImportError:
        pass
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        os.environ.update({k: "1" for k in env})
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


HF_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled")


def _hf_home() -> str:
    return os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_pyiqa_metric(name: str, device: str = "cpu", allow_download: bool = False):
    """`pyiqa.create_metric(PYIQA_NAMES[name])`; raises WeightsUnavailable when a weight file is
    missing and downloads are off, ImportError without pyiqa."""
    if name not in PYIQA_NAMES:
        raise ValueError(f"unknown metric: {name!r} (choose from {', '.join(PYIQA_NAMES)})")
    _quiet_env()
    import pyiqa

    if allow_download:
        return pyiqa.create_metric(PYIQA_NAMES[name], device=device)
    log = io.StringIO()  # pyiqa and torch.hub announce "Downloading: ..." before the hook refuses
    try:
        with no_downloads(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return pyiqa.create_metric(PYIQA_NAMES[name], device=device)
    except Exception as e:
        if type(e).__name__ in HF_OFFLINE_ERRORS:  # timm / transformers weights on the HF hub
            raise WeightsUnavailable(f"weights not in the Hugging Face cache ({_hf_home()}); downloads are "
                                     f"off ({type(e).__name__})") from e
        raise


def _to_unit_tensor(images: Sequence[np.ndarray], device):
    import torch

    x = torch.from_numpy(np.stack([np.ascontiguousarray(i) for i in images])).permute(0, 3, 1, 2)
    return (x.float() / 255.0).to(device)


class MetricSuite:
    """PSNR / SSIM (Y, BasicSR) plus the learned metrics of Table 1 that can be built here.

    `available` maps a learned metric to its pyiqa model; `unavailable` maps the others to the
    reason (missing weights, missing library). `score` gives per-image values of PSNR, SSIM and
    every available per-image metric; `fid` compares two folders when FID is available.
    """

    def __init__(self, names: Sequence[str] = LEARNED_METRICS, *, device: str = "cpu",
                 allow_download: bool = False, crop_border: int = 4):
        unknown = [n for n in names if n not in PYIQA_NAMES and n not in ("psnr", "ssim")]
        if unknown:
            raise ValueError(f"unknown metrics: {unknown} (choose from {', '.join(PAPER_METRICS)})")
        self.device, self.crop_border = device, crop_border
        self.names = tuple(n for n in PAPER_METRICS if n in set(names) | {"psnr", "ssim"})
        self.available: Dict[str, object] = {}
        self.unavailable: Dict[str, str] = {}
        for name in self.names:
            if name in ("psnr", "ssim"):
                continue
            try:
                self.available[name] = build_pyiqa_metric(name, device, allow_download)
            except WeightsUnavailable as e:
                self.unavailable[name] = str(e)
            except ImportError as e:
                self.unavailable[name] = f"a library it needs does not import ({type(e).__name__}: {e})"
            except Exception as e:  # a broken download cache, an incompatible library version
                cause = e.__cause__ or e.__context__
                if isinstance(cause, WeightsUnavailable):
                    self.unavailable[name] = str(cause)
                else:
                    self.unavailable[name] = f"could not build ({type(e).__name__}: {e})"

    def status(self) -> Dict[str, str]:
        """{metric: "available" | "unavailable: <reason>"} in Table-1 order."""
        return {n: ("available" if n in ("psnr", "ssim") or n in self.available
                    else f"unavailable: {self.unavailable[n]}") for n in self.names}

    def score(self, sr: Sequence[np.ndarray], hr: Optional[Sequence[np.ndarray]] = None) -> Dict[str, list]:
        """Per-image metrics of uint8 HxWx3 SR images (against `hr` for full-reference ones).
        Returns {metric: [value per image]} for psnr, ssim (when `hr` is given) and every
        available per-image learned metric."""
        import torch

        out: Dict[str, list] = {}
        if hr is not None:
            if len(sr) != len(hr):
                raise ValueError(f"{len(sr)} SR images vs {len(hr)} HR images")
            out["psnr"] = [psnr_y(s, h, self.crop_border) for s, h in zip(sr, hr)]
            out["ssim"] = [ssim_y(s, h, self.crop_border) for s, h in zip(sr, hr)]
        if not self.available or not len(sr):
            return out
        x = _to_unit_tensor(sr, self.device)
        y = _to_unit_tensor(hr, self.device) if hr is not None else None
        with torch.no_grad():
            for name, metric in self.available.items():
                if name in SET_METRICS or (name in FULL_REFERENCE and y is None):
                    continue
                values = [metric(x[i:i + 1], y[i:i + 1]) if name in FULL_REFERENCE else metric(x[i:i + 1])
                          for i in range(len(x))]
                out[name] = [float(v.reshape(-1)[0]) for v in values]
        return out

    def fid(self, sr_dir: str, hr_dir: str) -> Optional[float]:
        """FID between two folders of images, None when FID is unavailable."""
        metric = self.available.get("fid")
        return None if metric is None else float(metric(sr_dir, hr_dir))


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Mean of each metric over per-image dicts (metrics missing from a row are skipped)."""
    keys = {k for r in rows for k in r}
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted(keys)}


__all__ = ["rgb_to_y", "crop_border", "psnr_y", "ssim_y", "ssim_map", "gaussian_window_1d",
           "MetricSuite", "WeightsUnavailable", "no_downloads", "build_pyiqa_metric",
           "PAPER_METRICS", "LEARNED_METRICS", "LOWER_BETTER", "PYIQA_NAMES", "mean_metrics"]
