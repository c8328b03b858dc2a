"""Per-step training metrics: one CSV and one TensorBoard run per stage, plus a loss-curve PNG.

Written by rank 0 only. Resume-safe: opening a log at `resume_step` drops every CSV row with a
larger step and purges the TensorBoard events after it, so a run that is restarted from a
checkpoint lists every step exactly once.

Layout under `directory`:  {run}.csv   {run}_loss.png   tb/{run}/events.*
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional

STEP = "step"


def duration_text(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_text(done: int, total: int, seconds: float, unit: str = "img", per_item: int = 1) -> str:
    """`done/total (pct), rate unit/s, ETA` for work that took `seconds` so far in this run;
    `per_item` units per item (images per training step)."""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    if seconds <= 0 or done <= 0:
        return f"{done}/{total}{pct}"
    rate = done / seconds
    eta = duration_text((total - done) / rate) if total >= done else "?"
    return f"{done}/{total}{pct}, {rate * per_item:.3g} {unit}/s, ETA {eta}"


def read_csv(path: str) -> List[Dict[str, str]]:
    """All rows of a metrics CSV as dicts of strings ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: str, header: List[str], rows: Iterable[Dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def truncate_csv(path: str, max_step: int) -> int:
    """Keep the rows with step <= `max_step`; returns how many rows were dropped."""
    rows = read_csv(path)
    keep = [r for r in rows if int(r[STEP]) <= max_step]
    if len(keep) != len(rows):
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        _write_csv(path, header, keep)
    return len(rows) - len(keep)


class MetricsLog:
    """Append one row of scalars per step to `{directory}/{run}.csv` and TensorBoard."""

    def __init__(self, directory: str, run: str, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        os.makedirs(directory, exist_ok=True)
        self.directory, self.run = directory, run
        self.csv_path = os.path.join(directory, f"{run}.csv")
        self.png_path = os.path.join(directory, f"{run}_loss.png")
        self.dropped = truncate_csv(self.csv_path, resume_step)
        with open(self.csv_path, "a+", newline="") as f:
            f.seek(0)
            self.header = next(csv.reader(f), [])
        self.tb = SummaryWriter(os.path.join(directory, "tb", run),
                                purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        row = {STEP: step, **{k: v for k, v in metrics.items() if k != STEP}}
        new_keys = [k for k in row if k not in self.header]
        if new_keys:  # a column appears (e.g. the first validation): rewrite with the wider header
            self.header = list(dict.fromkeys([STEP, *self.header, *row]))
            _write_csv(self.csv_path, self.header, read_csv(self.csv_path) + [row])
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.header, restval="").writerow(row)
        for k, v in row.items():
            if k != STEP and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, global_step=step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self, plot: bool = True) -> Optional[str]:
        """Close TensorBoard; write the loss-curve PNG (returns its path) when there are rows."""
        self.tb.close()
        if plot and read_csv(self.csv_path):
            return plot_losses(self.csv_path, self.png_path)
        return None


LOSS_PREFIXES = ("loss", "flow", "cons", "adv", "iqa", "disc")
VAL_PREFIX, BICUBIC_KEY = "val_psnr", "val_psnr_bicubic"
RAW_ALPHA = 0.25  # opacity of the raw per-step curves under their smoothed version


def smooth(values: List[float], weight: float) -> List[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): s_t = m_t / (1 - w^t),
    m_t = w m_(t-1) + (1 - w) x_t, m_0 = 0. A constant stays constant; weight 0 is the identity."""
    out, m = [], 0.0
    for t, x in enumerate(values, 1):
        m = weight * m + (1 - weight) * x
        out.append(m / (1 - weight ** t) if weight < 1 else x)
    return out


def smoothing_weight(n: int) -> float:
    """More smoothing for longer runs: 0 for <= 10 points, up to 0.95."""
    return 0.0 if n <= 10 else min(0.95, 1 - 10 / n)


def _series(rows: List[Dict[str, str]], key: str):
    pts = [(int(r[STEP]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return tuple(zip(*pts)) if pts else ((), ())


def loss_figure(rows: List[Dict[str, str]], keys: Optional[List[str]] = None, title: str = ""):
    """A matplotlib figure: every loss term of the stage on one axes (smoothed, raw faint; log
    scale when all positive) and, when validated, PSNR over steps against the bicubic line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or [k for k in rows[0] if k in LOSS_PREFIXES]
    val_keys = [k for k in rows[0] if k.startswith(VAL_PREFIX) and k != BICUBIC_KEY]
    fig, axes = plt.subplots(1, 2 if val_keys else 1, figsize=(11 if val_keys else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    positive = True
    for i, key in enumerate(keys):
        steps, values = _series(rows, key)
        if not steps:
            continue
        colour = f"C{i}"
        ax.plot(steps, values, color=colour, alpha=RAW_ALPHA, linewidth=0.8)
        ax.plot(steps, smooth(list(values), smoothing_weight(len(values))), color=colour, label=key)
        positive = positive and all(v > 0 for v in values)
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_title(f"{title} losses (smoothed; raw faint)".strip())
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    if val_keys:
        ax = axes[0][1]
        for i, key in enumerate(val_keys):
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o", color=f"C{i}", label=key.removeprefix(f"{VAL_PREFIX}_"))
        steps, values = _series(rows, BICUBIC_KEY)
        if steps:
            ax.plot(steps, values, linestyle="--", marker="_", markersize=14, color="gray", label="bicubic")
        ax.set_title("validation PSNR (dB)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(csv_path: str, png_path: str, keys: Optional[List[str]] = None) -> str:
    """`loss_figure` of a metrics CSV, written to a PNG."""
    import matplotlib.pyplot as plt

    name = os.path.splitext(os.path.basename(csv_path))[0]
    fig = loss_figure(read_csv(csv_path), keys, title=name)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
