"""benchmarks/gpu_suite.py: `--tiny` runs every section (tiny models, CPU) and prints one JSON
object with every section, its anchor and its ratio, so that the GPU run cannot rot."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = ("infer", "upscale_job", "upscale_4096", "train_stage1", "train_stage2", "ray_train", "caption",
            "pixel_quality", "data_cpu_scaling")


def run_suite(*args, timeout=1600):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bad_section_is_one_line_and_exit_2():
    proc = run_suite("--tiny", "--only", "infer,warp_drive", timeout=120)
    assert proc.returncode == 2 and "unknown section(s) ['warp_drive']" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
@pytest.mark.timeout(1700)  # the time boxes are a safety net for a loaded machine; idle, it takes minutes
def test_tiny_run_reports_every_section(tmp_path):
    proc = run_suite("--tiny", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # ONE JSON object on the last line
    assert list(result) == list(SECTIONS)
    for name, section in result.items():
        assert "error" not in section and "skipped" not in section, (name, section, proc.stderr[-3000:])
        ratio = section["ratio"]  # upscale_4096: extra MB per megapixel / limit, may be 0 on a tiny run
        assert "anchor" in section and (positive(ratio) or (name == "upscale_4096" and ratio == 0)), (name, section)
    infer = result["infer"]
    assert positive(infer["eager"]["batch2_img_per_s"]) and infer["anchor"]["img_per_s"] == 47.0
    assert "skipped" in infer["compiled"]  # torch.compile is timed on the GPU only
    job = result["upscale_job"]
    assert job["job"]["ok"] == 4 and job["job"]["error"] == 0 and positive(job["plain_loop_img_per_s"])
    assert job["ratio"] == pytest.approx(job["job_img_per_s"] / 120.0, rel=0.02, abs=1e-3)
    big = result["upscale_4096"]
    assert big["out192"]["output_megapixels"] == pytest.approx(192 * 192 / 1e6, abs=0.01)
    assert big["out192"]["peak_gpu_gb"] is None and big["out192"]["host_extra_mb"] >= 0
    assert positive(result["train_stage1"]["batch2"]["img_per_s"])
    assert positive(result["train_stage2"]["batch2"]["img_per_s"])
    rt = result["ray_train"]
    assert rt["ratio"] == pytest.approx(rt["torch_trainer_img_per_s"] / rt["bare_loop_img_per_s"], rel=0.02, abs=1e-3)
    assert positive(result["caption"]["batch2"]["captions_per_s"])
    quality = result["pixel_quality"]
    assert 5 < quality["anchor"]["psnr_y"] < 60 and 0 < quality["flowsr_1step"]["ssim_y"] <= 1
    assert quality["ratio"] == pytest.approx(quality["flowsr_1step"]["psnr_y"] / quality["anchor"]["psnr_y"], rel=1e-3)
    scaling = result["data_cpu_scaling"]
    assert set(scaling["pairs_per_s"]) == {"1", "2"}
    assert scaling["ratio"] == pytest.approx(scaling["pairs_per_s"]["2"] / scaling["pairs_per_s"]["1"], rel=0.02)
