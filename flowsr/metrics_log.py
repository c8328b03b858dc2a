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


def plot_losses(csv_path: str, png_path: str, keys: Optional[List[str]] = None) -> str:
    """Loss curves (one panel per term, log-scaled when positive) from a metrics CSV into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    keys = keys or [k for k in rows[0] if k in LOSS_PREFIXES or k.startswith("val_psnr")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(int(r[STEP]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="." if len(pts) < 50 else None)
            if all(v > 0 for v in values) and not key.startswith("val_"):
                ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
