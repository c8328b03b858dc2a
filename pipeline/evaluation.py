"""Scoring super-resolution against HR: the evaluation's config, its per-pair functions and its
Ray Data stage.

`method_outputs` makes every method's output of one (LR, HR) pair (bicubic, the model at each
step count); `evaluate_pairs` scores a list of pairs in memory (the ablations use it);
`PairEvaluator` is the stateful batch callable of `jobs.evaluate`'s actor pool (the model,
the baselines and the learned metrics loaded once), which saves every output under
OUT/images/<method>/<sample_id>.png (`image_path`) and maps a batch of pairs to per-image
metrics. Images are uint8 HxWx3 RGB arrays; PSNR / SSIM on Y with border = scale.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from flowsr.metrics import LEARNED_METRICS, PAPER_METRICS, MetricSuite, mean_metrics
from pipeline.output import path_inside, write_bytes_atomic
from pipeline.schema import decode_png, encode_png
from pipeline.storage import cached_copy, is_local, resolve_fs

BICUBIC = "bicubic"
WINNER_METRICS = ("psnr", "ssim")  # per image, the method with the highest value is named
WINNER_COLUMNS = tuple(f"best_{m}" for m in WINNER_METRICS)
ERROR_COLUMN = "error"  # of a result row: why its pair could not be scored ("" when it was)
BASELINE_NAME = re.compile(r"[A-Za-z0-9._+-]+")
SAFE_NAME_MAX = 120  # characters kept of a name before its hash


def safe_name(text: str) -> str:
    """`text` as one file-name component: unchanged when it is only letters, digits, `.`, `_`,
    `-` (and does not start with `.`), else those characters kept, the rest replaced by `_`,
    plus the first 10 hex digits of its sha1 (distinct names stay distinct)."""
    kept = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:SAFE_NAME_MAX].lstrip(".")
    if kept == text and kept:
        return text
    return f"{kept}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def image_path(out: str, key: str, sample_id: str) -> str:
    """OUT/images/<key>/<sample_id>.png, both parts as `safe_name`s."""
    return os.path.join(out, "images", safe_name(key), f"{safe_name(sample_id)}.png")


def step_key(steps: int) -> str:
    return f"{steps}-step"


@dataclass(frozen=True)
class EvalConfig:
    data: str  # Parquet shards (pipeline/schema.py) or a folder of HR images
    out: str
    lr_dir: Optional[str] = None  # LR folder when `data` is an HR folder
    checkpoint: Optional[str] = None
    sr: Tuple[Tuple[str, str], ...] = ()  # (method name, folder of SR outputs named like the HR files)
    baselines: Tuple[Tuple[str, str], ...] = ()  # (method name, model run in the job: pipeline.sr_models)
    steps: Tuple[int, ...] = (1, 4)
    scale: int = 4
    metrics: Tuple[str, ...] = LEARNED_METRICS
    allow_download: bool = False
    dataset_name: str = ""  # Table-1 "Datasets" column; default: the data folder's name
    method_name: str = "FlowSR"
    weights: str = "student"  # student | target (EMA)
    pretrained: Optional[str] = None  # override the SD base model location in the checkpoint
    color_fix: str = "none"  # none | wavelet | adain (what jobs.upscale applies by default: wavelet)
    tile: Optional[int] = None  # output pixels; None: whole images
    seed: int = 0  # noise of the Table-2 flow variants, per image from (seed, sample_id, steps)
    limit: Optional[int] = None
    batch_size: int = 4
    num_actors: int = 1
    num_gpus: float = 0.0  # per actor
    report_images: int = 4
    crop_size: int = 128  # HR pixels of each report crop
    address: Optional[str] = None
    overwrite: bool = False  # replace the results OUT holds (another run's) instead of resuming them

    def __post_init__(self):
        if not is_local(self.out):
            raise ValueError(f"out must be a local folder (tables and report are written there), got {self.out}")
        if self.checkpoint is not None and self.sr:
            raise ValueError("give exactly one of checkpoint or SR folders (plus any baseline models)")
        if self.checkpoint is None and not self.sr and not self.baselines:
            raise ValueError("give exactly one of checkpoint or SR folders, or baseline models")
        if self.scale < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError(f"need scale >= 1 and step counts >= 1, got {self.scale}, {self.steps}")
        unknown = set(self.metrics) - set(PAPER_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics: {sorted(unknown)} (choose from {', '.join(PAPER_METRICS)})")
        if min(self.batch_size, self.num_actors) < 1:
            raise ValueError("batch_size and num_actors must be >= 1")
        names = [n for n, _ in self.sr + self.baselines]
        reserved = {BICUBIC, "hr", "lr", *WINNER_COLUMNS, *(step_key(s) for s in self.steps)}
        if len(set(names)) != len(names) or set(names) & reserved:
            raise ValueError(f"SR folder and baseline names must be unique and not {', '.join(sorted(reserved))}, "
                             f"got {names}")
        bad = [n for n, _ in self.baselines if not BASELINE_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"baseline names are folder names: letters, digits, '.', '_', '+' or '-', got {bad}")

    def methods(self) -> List[Tuple[str, str, str]]:
        """(key, Table-1 method, #steps) per evaluated row, bicubic first."""
        rows = [(BICUBIC, "Bicubic", "-")]
        rows += [(name, name, "-") for name, _ in self.baselines]
        if self.checkpoint is not None:
            rows += [(step_key(s), self.method_name, str(s)) for s in self.steps]
        rows += [(name, name, "-") for name, _ in self.sr]
        return rows


# ---- one pair ------------------------------------------------------------------------------------
def bicubic(lr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """LR uint8 HxWx3 -> bicubic (torch, as the model's input) at `size` = (H, W), uint8."""
    from flowsr.sample import resize_to
    from flowsr.upscaler import array_to_tensor, tensor_to_array

    return tensor_to_array(resize_to(array_to_tensor(lr), size)[0])


def super_resolve_image(backbone, lr: np.ndarray, size: Tuple[int, int], steps: int, *, seed: int = 0,
                        sample_id: str = "", color_fix: str = "none", tile: Optional[int] = None) -> np.ndarray:
    """LR uint8 HxWx3 -> SR uint8 at `size` with `steps` Euler steps (`flowsr.sample.upscale`); the
    sampling noise is drawn from (seed, sample_id, steps) (`flowsr.data.sample_generator`)."""
    import torch

    from flowsr.data import sample_generator
    from flowsr.sample import upscale
    from flowsr.upscaler import array_to_tensor, tensor_to_array

    device = next(iter(backbone.parameters())).device
    with torch.no_grad():
        sr = upscale(backbone, array_to_tensor(lr, device), steps=steps, out_size=tuple(size), tile=tile,
                     vae_tile=tile, color_fix=color_fix, generator=sample_generator(seed, sample_id, steps))
    return tensor_to_array(sr[0])


def _check_sizes(lr: np.ndarray, hr: np.ndarray, scale: int, sample_id: str) -> None:
    if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(f"{sample_id}: HR {hr.shape[:2]} is not {scale}x LR {lr.shape[:2]}")


def method_outputs(backbone, lr: np.ndarray, hr: np.ndarray, steps: Sequence[int], *, scale: int = 4,
                   seed: int = 0, sample_id: str = "", color_fix: str = "none",
                   tile: Optional[int] = None) -> Dict[str, np.ndarray]:
    """{"bicubic": ..., "1-step": ..., ...}: every method's uint8 output at the HR size."""
    _check_sizes(lr, hr, scale, sample_id)
    out = {BICUBIC: bicubic(lr, hr.shape[:2])}
    if backbone is not None:
        for s in steps:
            out[step_key(s)] = super_resolve_image(backbone, lr, hr.shape[:2], s, seed=seed, sample_id=sample_id,
                                                   color_fix=color_fix, tile=tile)
    return out


def evaluate_pairs(backbone, pairs: Sequence[Tuple[np.ndarray, np.ndarray]], steps: Sequence[int] = (1, 4), *,
                   scale: int = 4, suite: Optional[MetricSuite] = None, seed: int = 0,
                   ids: Optional[Sequence[str]] = None, color_fix: str = "none", tile: Optional[int] = None,
                   return_images: bool = False) -> Dict:
    """Bicubic and `steps`-step SR of each (lr, hr) pair, scored against HR.

    pairs: uint8 HxWx3 RGB arrays, HR exactly `scale` x LR. `suite` defaults to PSNR / SSIM only
    (border = scale). Returns {"per_image": [{"id", "bicubic": {metric: value}, "1-step": {...},
    ...}], "mean": {method: {metric: mean}}, "methods": [...]}; with `return_images` each
    per-image entry also has "images": {method: uint8 array}.
    """
    suite = suite or MetricSuite((), crop_border=scale)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(pairs))]
    per_image = []
    for sid, (lr, hr) in zip(ids, pairs):
        outputs = method_outputs(backbone, lr, hr, steps, scale=scale, seed=seed, sample_id=sid,
                                 color_fix=color_fix, tile=tile)
        entry = {"id": sid}
        for key, sr in outputs.items():
            entry[key] = {m: v[0] for m, v in suite.score([sr], [hr]).items()}
        if return_images:
            entry["images"] = outputs
        per_image.append(entry)
    methods = [BICUBIC] + ([step_key(s) for s in steps] if backbone is not None else [])
    mean = {k: mean_metrics([e[k] for e in per_image]) for k in methods}
    return {"per_image": per_image, "mean": mean, "methods": methods}


# ---- the Ray Data stage ----------------------------------------------------------------------------
class PairEvaluator:
    """Stateful batch callable: loads the checkpoint and the learned metrics once, maps a batch
    of pairs to a batch of per-image metrics (columns "sample_id" and "<method>/<metric>").

    Batch in: "sample_id" and either "hr" / "lr" (encoded bytes) or "hr_uri" / "lr_uri", plus
    "sr_uri/<name>" per SR folder. Runs without Ray in a plain loop as well.
    """

    def __init__(self, cfg: Mapping, metrics: Sequence[str] = ()):
        import torch

        self.cfg = EvalConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.backbone = None
        if self.cfg.checkpoint is not None:
            from flowsr.checkpoint import load_for_inference

            pretrained = cached_copy(self.cfg.pretrained) if self.cfg.pretrained else None
            self.backbone, _ = load_for_inference(cached_copy(self.cfg.checkpoint), device=self.device,
                                                  weights=self.cfg.weights, pretrained=pretrained)
        self.baselines = {}
        if self.cfg.baselines:
            from pipeline.sr_models import load_upscaler

            tile = self.cfg.tile // self.cfg.scale if self.cfg.tile else None  # input pixels
            self.baselines = {name: load_upscaler(cached_copy(model), scale=self.cfg.scale, tile=tile, device=self.device,
                                                  dtype="fp32", color_fix=self.cfg.color_fix)
                              for name, model in self.cfg.baselines}
        self.suite = MetricSuite(metrics, device=str(self.device), allow_download=self.cfg.allow_download,
                                 crop_border=self.cfg.scale)
        self.fs, self.out_root = resolve_fs(self.cfg.out)

    def _read(self, uri: str) -> bytes:
        fs, path = resolve_fs(uri)
        with fs.open_input_file(path) as f:
            return f.read()

    def _save(self, key: str, sample_id: str, image: np.ndarray) -> None:
        path = path_inside(self.fs, self.out_root, "images", safe_name(key), f"{safe_name(sample_id)}.png")
        write_bytes_atomic(self.fs, path, encode_png(image))

    def evaluate_one(self, sample_id: str, hr: np.ndarray, lr: np.ndarray, sr: Mapping[str, np.ndarray]) -> Dict:
        c = self.cfg
        outputs = method_outputs(self.backbone, lr, hr, c.steps, scale=c.scale, seed=c.seed, sample_id=sample_id,
                                 color_fix=c.color_fix, tile=c.tile)
        for name, upscaler in self.baselines.items():
            (outputs[name],), _ = upscaler.upscale_images([lr])
        for name, image in sr.items():
            if image.shape != hr.shape:
                raise ValueError(f"{sample_id}: SR '{name}' {image.shape} does not match HR {hr.shape}")
            outputs[name] = image
        row = {"sample_id": sample_id}
        for key, image in outputs.items():
            for metric, values in self.suite.score([image], [hr]).items():
                row[f"{key}/{metric}"] = values[0]
        for key, image in {"hr": hr, "lr": lr, **outputs}.items():
            self._save(key, sample_id, image)
        return row

    def pair_row(self, batch: Dict, i: int) -> Dict:
        """The result row of pair `i` of `batch`: its metrics, or, when it cannot be scored, its
        ERROR_COLUMN saying why (and no metrics)."""
        sid = str(batch["sample_id"][i])
        try:
            hr_bytes = batch["hr"][i] if "hr" in batch else self._read(str(batch["hr_uri"][i]))
            lr_bytes = batch["lr"][i] if "lr" in batch else self._read(str(batch["lr_uri"][i]))
            sr = {k.split("/", 1)[1]: decode_png(self._read(str(batch[k][i])))
                  for k in batch if k.startswith("sr_uri/")}
            return {**self.evaluate_one(sid, decode_png(hr_bytes), decode_png(lr_bytes), sr), ERROR_COLUMN: ""}
        except Exception as err:  # noqa: BLE001 — one bad pair must not cost the others their scores
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return {"sample_id": sid, ERROR_COLUMN: f"{type(err).__name__}: {reason}"}

    def __call__(self, batch: Dict) -> Dict:
        rows = [self.pair_row(batch, i) for i in range(len(batch["sample_id"]))]
        if not rows:  # every pair of the batch had committed results already
            return {"sample_id": np.asarray([], dtype=str)}
        keys = sorted({k for r in rows for k in r})
        return {k: np.asarray([r.get(k, "" if k in ("sample_id", ERROR_COLUMN) else np.nan) for r in rows])
                for k in keys}
