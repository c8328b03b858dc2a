"""The jobs' reports: metric formatting, Markdown / CSV / HTML tables, image crops and the HTML
page, written once, and the pages built from them: the evaluation's Table 1 (table1.md /
table1.csv) and report.html, and the demo's report.html. `jobs.ablate` writes its tables with
the same table functions. Every file is written atomically; every page escapes all it prints.
"""
from __future__ import annotations

import csv
import html
import io
import os
import shutil
import urllib.parse
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from flowsr.metrics import LOWER_BETTER
from pipeline.evaluation import ERROR_COLUMN, WINNER_METRICS, EvalConfig, image_path, safe_name
from pipeline.output import path_inside, write_bytes_atomic
from pipeline.schema import decode_png, encode_png
from pipeline.storage import resolve_fs

# Table-1 column headers and number formats, as printed in the paper
METRIC_HEADERS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "dists": "DISTS", "fid": "FID", "niqe": "NIQE",
                  "musiq": "MUSIQ", "maniqa": "MANIQA", "clipiqa": "CLIPQA"}
DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "dists": 4, "fid": 2, "niqe": 2, "musiq": 2, "maniqa": 4, "clipiqa": 4}
REPORT_DISPLAY = 256  # crops are shown enlarged by an integer factor to about this many pixels
STYLE = ("body{font-family:sans-serif;margin:2em%s} table{border-collapse:collapse}\n"
         "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right} .row{display:flex;gap:8px;flex-wrap:wrap}\n"
         "figure{margin:0;text-align:center} img{image-rendering:pixelated}")


# ---- formats and files -------------------------------------------------------------------------
def format_metric(metric: str, value: Optional[float]) -> str:
    """`value` with the paper's decimals for `metric`; "n/a" when missing or not finite."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{DECIMALS.get(metric, 4)}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    """A text file at `path` (a local path or URI), written atomically."""
    fs, target = resolve_fs(path)
    write_bytes_atomic(fs, target, text.encode())


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV file at `path` (a local path or URI), written atomically."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(headers)
    w.writerows(rows)
    write_text(path, text.getvalue())


# ---- HTML --------------------------------------------------------------------------------------
def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return table + "</table>"


def figure(src: str, caption: str, width: int, height: Optional[int] = None) -> str:
    """An image with its caption; `src` a relative path (URL-quoted here), `caption` HTML."""
    src = html.escape(urllib.parse.quote(src), quote=True)
    size = f' width="{width}"' + (f' height="{height}"' if height is not None else "")
    return f'<figure><img src="{src}"{size}><figcaption>{caption}</figcaption></figure>'


def figure_row(heading: str, figures: Sequence[str]) -> str:
    """A heading (HTML) over one wrapping row of figures."""
    return f"<h3>{heading}</h3><div class='row'>{''.join(figures)}</div>"


def html_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def html_page(title: str, body: str, max_width: Optional[str] = None) -> str:
    """A whole page: `title` (text) and `body` (HTML) in the reports' one style."""
    style = STYLE % (f";max-width:{max_width}" if max_width else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{style}</style></head><body>
{body}
</body></html>
"""


def crop_box(shape, size: int, scale: int) -> Tuple[int, int, int]:
    """(top, left, size) of a centred crop on the LR grid, in HR pixels."""
    size = min(size, shape[0], shape[1]) // scale * scale
    top = (shape[0] - size) // 2 // scale * scale
    left = (shape[1] - size) // 2 // scale * scale
    return top, left, size


def crop(image: np.ndarray, box: Tuple[int, int, int], scale: int = 1) -> np.ndarray:
    """The `crop_box` of an HR-sized image; of an LR image (`scale` > 1) the same region,
    enlarged nearest-neighbour to the HR crop's size."""
    from PIL import Image

    top, left, size = box
    if scale == 1:
        return np.ascontiguousarray(image[top:top + size, left:left + size])
    small = image[top // scale:(top + size) // scale, left // scale:(left + size) // scale]
    return np.asarray(Image.fromarray(small).resize((size, size), Image.NEAREST))


# ---- the evaluation's Table 1 and report ---------------------------------------------------------
def table1(summary: Dict) -> Tuple[List[str], List[List[str]], List[List]]:
    """(headers, formatted rows, raw rows) of the paper's Table-1 layout."""
    metrics = summary["metrics_order"]
    headers = ["Datasets", "Methods", "#Steps"] + [METRIC_HEADERS[m] for m in metrics]
    shown, raw = [], []
    for i, (key, method, steps) in enumerate(summary["methods"]):
        values = summary["mean"].get(key, {})
        label = summary["dataset"] if i == 0 else ""
        shown.append([label, method, steps] + [format_metric(m, values.get(m)) for m in metrics])
        raw.append([summary["dataset"], method, steps] + [values.get(m, "") for m in metrics])
    return headers, shown, raw


def wins_table(summary: Dict) -> Tuple[List[str], List[List[str]]]:
    """(headers, rows): per method, the images on which it has the highest PSNR and SSIM."""
    wins = summary.get("wins", {})
    headers = ["Methods", "#Steps"] + [f"{METRIC_HEADERS[m]} wins" for m in WINNER_METRICS]
    rows = [[method, steps] + [str(wins.get(m, {}).get(key, 0)) for m in WINNER_METRICS]
            for key, method, steps in summary["methods"]]
    return headers, rows


def table1_markdown(summary: Dict) -> str:
    headers, shown, _ = table1(summary)
    arrows = {m: "↓" if m in LOWER_BETTER else "↑" for m in summary["metrics_order"]}
    headers = headers[:3] + [f"{h} {arrows[m]}" for h, m in zip(headers[3:], summary["metrics_order"])]
    notes = [f"- {METRIC_HEADERS[m]}: {reason}" for m, reason in summary["unavailable"].items()]
    text = markdown_table(headers, shown)
    text += f"\n\nPSNR / SSIM on the Y channel (BasicSR), border {summary['scale']} px; {summary['n_images']} images."
    if notes:
        text += "\n\nn/a = unavailable here (never estimated):\n" + "\n".join(notes)
    if summary.get("wins"):
        text += f"\n\nPer-image wins (highest value of {summary['n_images']} images):\n\n"
        text += markdown_table(*wins_table(summary))
    return text + "".join(f"\n\n{line}" for line in problem_lines(summary)) + "\n"


def problem_lines(summary: Dict) -> List[str]:
    """What the tables leave out, in words: pairs that could not be scored, names without a pair."""
    lines = []
    if summary.get("errors"):
        lines.append(f"{summary['errors']} pairs could not be scored (per_image.csv, column `{ERROR_COLUMN}`): "
                     + "; ".join(f"{r['sample_id']}: {r[ERROR_COLUMN]}" for r in summary["failed"]))
    if summary.get("n_unmatched"):
        lines.append(f"{summary['n_unmatched']} names are not in every input folder, so not evaluated: "
                     + "; ".join(f"{r['name']} (no {r['missing']})" for r in summary["unmatched"]))
    return lines


def _read_png(out: str, key: str, sample_id: str) -> np.ndarray:
    with open(image_path(out, key, sample_id), "rb") as f:
        return decode_png(f.read())


def _crop_row(row: Mapping, cfg: EvalConfig, columns: Sequence[Tuple[str, str]]) -> str:
    """One image's crops (written as PNG files into OUT/report/) as a row of figures, each
    captioned with its PSNR, headed by the image's id and its PSNR / SSIM winners."""
    out, sid = cfg.out, row["sample_id"]
    fs, root = resolve_fs(out)
    box = crop_box(_read_png(out, "hr", sid).shape, cfg.crop_size, cfg.scale)
    shown = box[2] * max(1, REPORT_DISPLAY // box[2])
    cells = []
    for key, title in columns:
        file_name = f"{safe_name(f'{sid}_{key}')}.png"
        image = crop(_read_png(out, key, sid), box, cfg.scale if key == "lr" else 1)
        write_bytes_atomic(fs, path_inside(fs, root, "report", file_name), encode_png(image))
        score = row.get(f"{key}/psnr")
        caption = html.escape(title) + (f"<br>{score:.2f} dB" if score is not None and np.isfinite(score) else "")
        cells.append(figure(f"report/{file_name}", caption, shown, shown))
    best = {m: dict(columns).get(row.get(f"best_{m}", ""), "") for m in WINNER_METRICS}
    heading = html.escape(sid) + "".join(f" &middot; best {METRIC_HEADERS[m]}: {html.escape(best[m])}"
                                         for m in WINNER_METRICS if best[m])
    return figure_row(heading, cells)


def write_report(summary: Dict, cfg: EvalConfig, per_image: List[Dict]) -> str:
    """OUT/report.html next to the tables, with crops of the first `report_images` samples as
    PNG files in OUT/report/ (LR shown nearest-neighbour enlarged); returns its path."""
    columns = [("lr", "LR (before)")] + [(k, f"{m}" + (f" ({s} step{'s' if s != '1' else ''})" if s != "-" else ""))
                                         for k, m, s in summary["methods"]] + [("hr", "HR")]
    blocks = [_crop_row(row, cfg, columns) for row in per_image[:cfg.report_images]]
    headers, shown, _ = table1(summary)
    notes = [f"{html.escape(METRIC_HEADERS.get(m, m))}: {html.escape(str(r))}" for m, r in summary["unavailable"].items()]
    problems = ""
    if summary.get("errors"):
        problems += (f"<h2>Pairs not scored ({int(summary['errors'])})</h2>"
                     + html_list([f"{html.escape(r['sample_id'])}: {html.escape(r[ERROR_COLUMN])}"
                                  for r in summary["failed"]]))
    if summary.get("n_unmatched"):
        problems += (f"<h2>Names not in every folder ({int(summary['n_unmatched'])})</h2>"
                     + html_list([f"{html.escape(r['name'])}: no {html.escape(r['missing'])}"
                                  for r in summary["unmatched"]]))
    dataset, scale = html.escape(summary["dataset"]), html.escape(str(summary["scale"]))
    body = f"""<h1>FlowSR evaluation: {dataset}</h1>
<p>{int(summary['n_images'])} images, x{scale}; PSNR / SSIM on Y (BasicSR), border {scale} px.
Crops of {cfg.crop_size}px (HR) from the image centre; the caption gives the image's PSNR.</p>
{html_table(headers, shown)}<h2>Per-image wins</h2>{html_table(*wins_table(summary))}
{f"<p>Unavailable metrics (never estimated):</p>{html_list(notes)}" if notes else ""}
{problems}
<h2>Crops</h2>
{''.join(blocks)}"""
    path = os.path.join(cfg.out, "report.html")
    write_text(path, html_page(f"FlowSR evaluation: {summary['dataset']}", body))
    return path


# ---- the demo's report ---------------------------------------------------------------------------
DEMO_CROPS = (("lr", "LR"), ("bicubic", "bicubic"), ("1-step", "FlowSR 1 step"), ("4-step", "FlowSR 4 steps"),
              ("hr", "HR"))


def write_demo_report(out: str, *, evaluation: Dict, eval_dir: str, curves: Dict[str, Optional[str]],
                      upscaled: Dict, timings: Dict[str, float], data_text: str) -> str:
    """OUT/report.html of the demo: the metric table with the gain over bicubic, the loss curves
    (copied next to it), LR / bicubic / 1-step / 4-step / HR crops (the evaluation's crop files
    in `eval_dir`/report), and what the upscaling job wrote. `data_text` (HTML) says what the
    model was trained and evaluated on. Returns the page's path."""
    mean = evaluation["mean"]
    methods = [m for m in ("bicubic", "1-step", "4-step") if m in mean]
    rows = [[m, format_metric("psnr", mean[m]["psnr"]), format_metric("ssim", mean[m]["ssim"])] for m in methods]
    gain = mean["1-step"]["psnr"] - mean["bicubic"]["psnr"]
    verdict = (f"The 1-step model {'beats' if gain > 0 else 'does NOT beat'} bicubic by {gain:+.2f} dB PSNR "
               f"on {evaluation['n_images']} held-out crops.")
    curve_figures = []
    for stage, path in curves.items():
        if path and os.path.exists(path):
            name = f"{stage}_loss.png"
            shutil.copy(path, os.path.join(out, name))
            curve_figures.append(figure(name, f"{html.escape(stage)} losses", 480))
    report_dir = os.path.join(eval_dir, "report")
    rel = os.path.relpath(report_dir, out)
    ids = sorted({f.rsplit("_", 1)[0] for f in os.listdir(report_dir)}) if os.path.isdir(report_dir) else []
    crops = "".join(figure_row(html.escape(sid), [
        figure(f"{rel}/{sid}_{key}.png", html.escape(title), 160, 160) for key, title in DEMO_CROPS
        if os.path.exists(os.path.join(report_dir, f"{sid}_{key}.png"))]) for sid in ids)
    phases = html_list([f"{html.escape(k)}: {v:.0f} s" for k, v in timings.items()])
    body = f"""<h1>FlowSR demo</h1>
<p>{data_text}</p>
<p><b>{html.escape(verdict)}</b></p>
<h2>Held-out metrics (PSNR / SSIM on Y, border 4)</h2>
{html_table(["method", "PSNR (dB)", "SSIM"], rows)}
<h2>Loss curves</h2><div class="row">{''.join(curve_figures)}</div>
<h2>Crops: LR / bicubic / 1 step / 4 steps / HR</h2>{crops}
<h2>Bulk upscaling job</h2><p>{upscaled.get('ok', 0)} images upscaled x4 with 1 step into
<code>{html.escape(upscaled.get('output', ''))}</code> ({upscaled.get('error', 0)} failed, {upscaled.get('skipped', 0)} already done).</p>
<h2>Time per phase</h2>{phases}"""
    path = os.path.join(out, "report.html")
    write_text(path, html_page("FlowSR demo report", body, max_width="1100px"))
    return path
