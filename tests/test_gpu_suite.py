"""benchmarks/gpu_suite.py: `--tiny` runs every section (tiny models, CPU) and writes one merged
gpu_suite.json with every section, its anchor and its ratio, so that the GPU run cannot rot; a run
cut off keeps what finished; a module the GPU image lacks stops it with one line."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = ("infer", "upscale_job", "upscale_4096", "train_stage1", "train_stage2", "ray_train", "caption",
            "pixel_quality", "data_cpu_scaling")


def suite_env(*first_on_path):
    path = os.pathsep.join([*map(str, first_on_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return env


def run_suite(*args, timeout=1600, env=None, module=False):
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite"] if module else [sys.executable, str(SUITE)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env or suite_env(),
                          timeout=timeout, cwd=ROOT)


def read_report(out: Path) -> dict:
    return json.loads((out / "gpu_suite.json").read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bad_arguments_are_one_line_and_exit_2():
    proc = run_suite("--tiny", "--only", "infer,warp_drive", timeout=120)
    assert proc.returncode == 2 and "unknown section(s) ['warp_drive']" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run_suite("--box", "caption=soon", timeout=120, module=True)  # also: importable as a package
    assert proc.returncode == 2 and "--box wants SECTION=SECONDS, got 'caption=soon'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_preflight_names_a_missing_module_in_one_line(tmp_path):
    """The GPU image lacks what the wheel pack does not add: here spandrel is hidden from the run
    (a package of that name that fails to import comes first on the path)."""
    hidden = tmp_path / "hide" / "spandrel"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("hidden from this run")\n')
    out = tmp_path / "out"
    proc = run_suite("--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out), timeout=600,
                     env=suite_env(tmp_path / "hide"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gpu_suite: preflight")]
    assert lines == [lines[-1]] and proc.stderr.rstrip().endswith(lines[-1])  # one line, the last
    assert "missing spandrel (ImportError: hidden from this run; needed by jobs.upscale)" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    report = read_report(out)
    assert report["preflight"]["ok"] is False and list(report["preflight"]["missing"]) == ["spandrel"]
    assert report["sections"] == {} and report["pending"] == list(SECTIONS) and report["complete"] is False


def test_cut_off_run_keeps_what_finished(tmp_path):
    """A section out of time is recorded as such, and a run killed (SIGKILL, as a command limit
    does) mid-section leaves a whole gpu_suite.json holding every section finished before."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SUITE), "--tiny", "--no-preflight", "--workdir", str(tmp_path / "w"),
                             "--out", str(out), "--only", "upscale_4096,pixel_quality,caption",
                             "--box", "pixel_quality=1", "--quality-seconds", "30"],  # it cannot fit its box
                            env=suite_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    report, deadline = {}, time.monotonic() + 600
    try:
        def settled(record):  # the driver's final record of the section, not its running copy
            return "time_box_s" in record and not record.get("running")

        while not settled(report.get("sections", {}).get("pixel_quality", {})) and proc.poll() is None:
            assert time.monotonic() < deadline, "pixel_quality never finished"
            time.sleep(0.1)
            if (out / "gpu_suite.json").exists():
                report = read_report(out)  # always whole: written atomically
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]  # killed in caption, not finished
    report = read_report(out)
    assert report["complete"] is False and "caption" in report["pending"]
    assert report["preflight"] == {"ok": True, "skipped": "--no-preflight", "seconds": 0.0}
    big = report["sections"]["upscale_4096"]
    assert "running" not in big and "error" not in big and big["ratio"] is not None and big["seconds"] > 0
    cut = report["sections"]["pixel_quality"]
    assert cut["timed_out"] is True and cut["error"] == "time box of 1 s ran out" and cut["time_box_s"] == 1
    assert set(report["sections"]) <= {"upscale_4096", "pixel_quality", "caption"}
    assert report["sections"].get("caption", {}).get("running", True) is True  # only ever partial


@pytest.mark.slow
@pytest.mark.timeout(1700)  # the time boxes are a safety net for a loaded machine; idle, it takes minutes
def test_tiny_run_reports_every_section(tmp_path):
    out = tmp_path / "out"
    proc = run_suite("--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = read_report(out)
    result = report["sections"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the last stdout line: the same
    assert report["complete"] is True and report["pending"] == [] and list(result) == list(SECTIONS)
    assert report["preflight"]["ok"] is True and len(report["preflight"]["passed"]) == 5
    for name, section in result.items():
        assert "error" not in section and "skipped" not in section and "running" not in section, (name, section)
        ratio = section["ratio"]  # upscale_4096: extra MB per megapixel / limit, may be 0 on a tiny run
        assert section["anchor"]["kind"] in ("same-run", "absolute"), (name, section)
        assert positive(ratio) or (name == "upscale_4096" and ratio == 0), (name, section)
    infer = result["infer"]
    best = infer["eager"]["batch2_img_per_s"]
    assert positive(best) and positive(infer["tflop_per_image"]) and "skipped" in infer["compiled"]
    assert infer["achieved_tflops"] == pytest.approx(best * infer["tflop_per_image"], rel=0.01)
    assert infer["anchor"]["tflops"] == infer["limit"]["measured_matmul_tflops"] and infer["anchor"]["goal_ratio"] == 0.5
    assert infer["ratio"] == pytest.approx(infer["achieved_tflops"] / infer["anchor"]["tflops"], rel=0.01)
    job = result["upscale_job"]
    assert job["job"]["ok"] == 4 and job["job"]["error"] == 0 and positive(job["model_loop_img_per_s"])
    assert job["anchor"] == {**job["anchor"], "kind": "same-run", "img_per_s": job["model_loop_img_per_s"],
                             "goal_ratio": 0.9}
    assert job["ratio"] == pytest.approx(job["job_img_per_s"] / job["model_loop_img_per_s"], rel=0.01)
    big = result["upscale_4096"]
    assert big["out192"]["output_megapixels"] == pytest.approx(192 * 192 / 1e6, abs=0.01)
    assert big["out192"]["peak_gpu_gb"] is None and big["out192"]["host_extra_mb"] >= 0
    for stage in ("train_stage1", "train_stage2"):
        assert positive(result[stage]["batch2"]["img_per_s"]) and result[stage]["anchor"]["kind"] == "absolute"
        assert "CUDA" in result[stage]["batch2"]["memory_estimate"]["skipped"]
    rt = result["ray_train"]
    assert rt["ratio"] == pytest.approx(rt["torch_trainer_img_per_s"] / rt["bare_loop_img_per_s"], rel=0.02, abs=1e-3)
    caption = result["caption"]["batch2"]
    assert positive(caption["captions_per_s"]) and positive(caption["plain_generate_captions_per_s"])
    assert result["caption"]["ratio"] == pytest.approx(
        caption["captions_per_s"] / caption["plain_generate_captions_per_s"], rel=0.01)
    quality = result["pixel_quality"]
    assert 5 < quality["anchor"]["psnr_y"] < 60 and 0 < quality["flowsr_1step"]["ssim_y"] <= 1
    assert quality["ratio"] == pytest.approx(quality["flowsr_1step"]["psnr_y"] / quality["anchor"]["psnr_y"], rel=1e-3)
    scaling = result["data_cpu_scaling"]
    assert set(scaling["pairs_per_s"]) == {"1", "2"} and scaling["anchor"]["goal_ratio"] == {"2": 1.7}
    assert scaling["ratio"] == pytest.approx(scaling["pairs_per_s"]["2"] / scaling["pairs_per_s"]["1"], rel=0.02)


def test_gpu_time_boxes_fit_the_default_budget():
    """On the GPU the preflight, the model set-up and every section's time box fit the default
    budget (420 s from the process start, inside a 600 s command limit that leaves a rerun):
    no section is starved by the ones before it."""
    from benchmarks import gpu_suite as suite

    boxes = sum(gpu for gpu, _ in suite.SECTIONS.values())
    assert suite.DEFAULT_BUDGET_S[False] <= 420
    assert suite.PREFLIGHT_S + suite.SETUP_BOX_S + boxes <= suite.DEFAULT_BUDGET_S[False] - suite.END_MARGIN_S
    assert all(gpu >= suite.MIN_BOX_S for gpu, _ in suite.SECTIONS.values())


def test_report_merges_a_running_section_from_another_process(tmp_path):
    """The GPU path: a section's own process merges its figures so far into the report file
    (marked running); the suite's final record replaces them; each write leaves a whole file."""
    from benchmarks import gpu_suite as suite

    report = suite.Report(str(tmp_path / "gpu_suite.json"), pending=["infer", "caption"])
    report.section("infer", {"ratio": 0.5})
    rec = suite.Record(str(tmp_path / "result-caption.json"),
                       lambda partial: suite.Report.running_section(report.path, "caption", partial))
    rec["batch8"] = {"captions_per_s": 3.0}
    on_disk = read_report(tmp_path)
    assert on_disk["sections"] == {"infer": {"ratio": 0.5}, "caption": {"batch8": {"captions_per_s": 3.0}, "running": True}}
    assert json.loads((tmp_path / "result-caption.json").read_text()) == {"batch8": {"captions_per_s": 3.0}}
    report.section("caption", {**rec, "ratio": 1.1})
    on_disk = read_report(tmp_path)
    assert on_disk["sections"]["caption"] == {"batch8": {"captions_per_s": 3.0}, "ratio": 1.1}
    assert on_disk["pending"] == [] and sorted(os.listdir(tmp_path)) == ["gpu_suite.json", "result-caption.json"]
