"""The embedded demo end to end (short schedule), and its report rendered in headless Chromium."""
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_PAGE = """<!doctype html><html><body><iframe id="r" src="report.html" width="1200" height="900"></iframe>
<pre id="result">pending</pre><script>
document.getElementById('r').addEventListener('load', () => {
  const imgs = Array.from(document.getElementById('r').contentDocument.images);
  const state = imgs.map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
  document.getElementById('result').textContent = JSON.stringify(state);
});
</script></body></html>"""


def _chromium(*args, timeout=120):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`flowsr demo` as a user runs it: its own process, its console (stdout and stderr as one
    stream) kept for the checks below, its figures read back from `summary.json`."""
    import sys

    from jobs.demo import SUMMARY_FILE

    out = tmp_path_factory.mktemp("demo")
    # the demo's own schedule (400 + 100 steps, 64 crops per image, every held-out tile): shorter
    # ones do not beat bicubic (stage-1 validation, 1-step minus bicubic: -0.001 dB after 150
    # steps, -0.07 dB after 300 with 16 crops per image)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--out", str(out)], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(out / SUMMARY_FILE) as f:
        return {**json.load(f), "console": proc.stdout}


ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bE\d{4} |\[E\]|Error:|Failed to|core_worker\.cc|raylet\.cc"
                        r"|PlacementGroupCleaner|PreemptionWatcher|kernels-community")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s")


@pytest.mark.slow
def test_demo_console_has_no_ray_error_lines_and_no_repeats(demo_run):
    """What a user sees: the phases, one line per logged training step, the figures; no Ray error
    or warning dumps (they stay in the session's log folder) and no line printed twice."""
    from jobs.common import ACTOR_PREFIX, ANSI

    lines = [ANSI.sub("", line) for line in demo_run["console"].splitlines()]
    errors = [line for line in lines if ERROR_LINE.search(line)]
    assert errors == [], "\n".join(errors[:10])
    bodies = [TIMESTAMP.sub("", ACTOR_PREFIX.sub("", line)).strip() for line in lines]
    bodies = [b for b in bodies if b]
    repeats = [b for i, b in enumerate(bodies) if b in bodies[max(0, i - 8):i]]
    assert repeats == [], "\n".join(repeats[:10])
    steps = [b for b in bodies if re.match(r"INFO flowsr\.train: stage [12] step \d+/\d+", b)]
    assert len(steps) == len(set(steps)) >= 2  # both stages log, each step once
    assert sum(b.startswith("== ") for b in bodies) == 5 and bodies[-1].startswith("report: ")


@pytest.mark.slow
def test_demo_writes_report_and_upscaled_outputs(demo_run):
    assert os.path.exists(demo_run["report"])
    mean = demo_run["mean"]
    assert {"bicubic", "1-step", "4-step"} <= set(mean)
    assert demo_run["heldout_pairs"] == 18  # every 128-px tile: 6 of chelsea, 12 of coffee
    assert demo_run["upscale"]["ok"] == 18 and demo_run["upscale"]["error"] == 0
    page = open(demo_run["report"]).read()
    assert "Loss curves" in page
    # the number the report shows, parsed: the 1-step model must beat bicubic on the held-out tiles
    match = re.search(r"The 1-step model (beats|does NOT beat) bicubic by ([+-]\d+\.\d+) dB PSNR", page)
    assert match, "no verdict in the report"
    shown = float(match.group(2))
    assert shown == pytest.approx(demo_run["psnr_gain_1step"], abs=0.006)
    assert shown == pytest.approx(mean["1-step"]["psnr"] - mean["bicubic"]["psnr"], abs=0.006)
    assert match.group(1) == "beats" and shown > 0, f"1-step minus bicubic: {shown:+.2f} dB"


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image_loaded(demo_run, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):  # CI installs chromium: its absence there is a failure, not a skip
            pytest.fail("CI is set but chromium is not installed (Debian package `chromium`)")
        pytest.skip("needs Debian's chromium (installed by .ci/run)")
    root = os.path.dirname(demo_run["report"])
    with open(os.path.join(root, "check.html"), "w") as f:
        f.write(CHECK_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        profile = str(tmp_path / "profile")
        dom = _chromium(f"--user-data-dir={profile}", "--dump-dom", f"{base}/check.html").stdout
        shot = tmp_path / "report.png"
        _chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2400",
                  f"{base}/report.html")
    finally:
        server.shutdown()
    match = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    images = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(images) >= 2 + 5  # two loss curves and at least one row of five crops
    assert all(i["ok"] for i in images), [i["src"] for i in images if not i["ok"]]
    assert shot.exists() and shot.stat().st_size > 10_000
