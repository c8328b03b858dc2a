"""Hostile corpora and operators: file names that are not UTF-8, outputs that cannot be written
(a file in the way, a full disk), a cluster address where nothing listens, SIGINT / SIGTERM,
one exit-status rule, and no working folders left after a finished run. Jobs run the way a user
runs them: through `jobs.cli.main` on this module's Ray, or as a subprocess where the test
needs the real stderr, a real signal or a process of its own."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import naming, upscale_manifest
from pipeline import inputs as pipeline_inputs

ROOT = str(Path(__file__).resolve().parents[1])


# ---- fixtures and helpers ------------------------------------------------------------------------
def _image(path, h=40, w=48, seed=0):
    """A noisy RGB PNG at `path` (str, bytes or Path); returns the pixels."""
    path = os.fsdecode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0"}


def _job(*argv):
    """`python -m jobs.cli ARGV` as a subprocess (the `flowsr` command)."""
    return [sys.executable, "-m", "jobs.cli", *argv]


def _cli(*argv):
    from jobs.cli import main

    try:
        return main(list(argv))
    except SystemExit as exit_:
        return exit_.code


def _tree(root):
    """Every file and folder under `root`, relative, as bytes (names need not be UTF-8)."""
    root = os.fsencode(root)
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def _outputs(out):
    return [p for p in _tree(out) if p.endswith(b".png") and not p.startswith(os.fsencode(naming.TMP_DIR))]


def _manifest(path):
    return pq.read_table(path).to_pylist()


def _error_lines(stderr: str):
    """stderr without the model line and the log lines (timestamped) a job prints as it runs."""
    return [line for line in stderr.strip().splitlines()
            if line.strip() and not line.startswith("[upscale]") and not line[:4].isdigit()]


# ---- 1. file names that are not valid UTF-8 ----------------------------------------------------------
def test_names_that_are_not_utf8_encode_losslessly():
    from pipeline import names

    odd = os.fsdecode(b"/photos/caf\xe9 50%.png")
    text = names.to_text(odd)
    assert text == "file:///photos/caf%E9%2050%25.png" and text.encode("utf-8")
    assert names.from_text(text) == odd and os.fsencode(names.from_text(text)) == b"/photos/caf\xe9 50%.png"
    for plain in ("/photos/50%.png", "file:///a/%41.png", "s3://b/caf\u00e9.png", "rel/x.png"):
        assert names.to_text(plain) == plain and names.from_text(plain) == plain  # UTF-8 names stay as they are
    with pytest.raises(names.UnencodableName, match=r"caf\\xe9"):
        names.to_text(os.fsdecode(b"s3://bucket/caf\xe9.png"))


def test_upscale_and_prepare_data_carry_names_that_are_not_utf8(ray_local, pixel_ckpt, tmp_path):
    """`caf\\xe9.png` (a Samba share's Latin-1 name) stopped both jobs before any image was
    processed. Now every image is processed under its own bytes, the tables hold the name as a
    percent-encoded file:// URI, a rerun recognises the outputs, and an output on an object
    store (UTF-8 keys only) gets an error row naming the escaped name."""
    from jobs.prepare_data import PrepareConfig, prepare
    from jobs.upscale import upscale_corpus
    from pipeline.pairs_dataset import read_errors
    from pipeline.upscale_config import UpscaleJobConfig

    src = os.fsencode(tmp_path / "in")
    odd = [b"caf\xe9.png", b"d\xff/x.png", b"50%.png"]
    pixels = {name: _image(src + b"/" + name, 40, 48, seed=i) for i, name in enumerate(odd)}
    (Path(os.fsdecode(src + b"/bad\xe9.png"))).write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = UpscaleJobConfig(input=os.fsdecode(src), output=str(out), checkpoint=pixel_ckpt, scale=2, tile=0,
                           color_fix="none")
    summary = upscale_corpus(cfg)
    from pipeline import names

    assert (summary["ok"], summary["error"]) == (3, 1)
    for name in odd:
        with Image.open(os.fsdecode(os.fsencode(out) + b"/" + name)) as im:
            assert im.size == (96, 80)
    rows = {os.fsencode(names.from_text(r["input"])): r for r in _manifest(summary["manifest"])}
    assert set(rows) == {src + b"/" + n for n in [*odd, b"bad\xe9.png"]}
    assert rows[src + b"/caf\xe9.png"]["input"] == names.to_text(os.fsdecode(src + b"/caf\xe9.png"))
    assert os.fsencode(names.from_text(rows[src + b"/d\xff/x.png"]["output"])) == os.fsencode(out) + b"/d\xff/x.png"
    assert rows[src + b"/bad\xe9.png"]["status"] == "error" and "bad%E9.png" in rows[src + b"/bad\xe9.png"]["input"]
    again = upscale_corpus(cfg)
    assert (again["skipped"], again["ok"], again["error"]) == (3, 0, 1)  # the outputs are found again

    data = tmp_path / "pairs"
    result = prepare(PrepareConfig(input=os.fsdecode(src), output=str(data), patch_size=32, scale=4,
                                   degradation="bicubic"))
    assert result["total_pairs"] == 3 and result["total_errors"] == 1
    shards = pq.read_table(data / "shards", columns=["source_uri", "hr"]).to_pylist()
    by_name = {os.fsencode(names.from_text(r["source_uri"])): r for r in shards}
    assert set(by_name) == {src + b"/" + n for n in odd}
    from pipeline.schema import image_bytes

    hr = np.asarray(Image.open(__import__("io").BytesIO(image_bytes(by_name[src + b"/caf\xe9.png"]["hr"]))))
    found = any(np.array_equal(pixels[b"caf\xe9.png"][y:y + 32, x:x + 32], hr) for y in range(9) for x in range(17))
    assert found  # the pair's HR patch is a crop of that very file
    errors = read_errors(str(data)).to_pylist()
    assert [os.fsencode(names.from_text(e["source_uri"])) for e in errors] == [src + b"/bad\xe9.png"]

    one = pipeline_inputs.Input(os.fsdecode(src + b"/caf\xe9.png"), os.fsdecode(b"caf\xe9.png"))
    listing = pipeline_inputs.Listing(iter([[one]]), True)
    chunks, _, _ = naming.write_listing(listing, str(tmp_path / "listing"), "s3://bucket/out", "same")
    row = pq.read_table(chunks[0]).to_pylist()[0]
    assert row["status"] == "error" and "caf\\xe9.png" in row["error"] and "s3://" in row["error"]


# ---- 2. an output that cannot be written -----------------------------------------------------------------
def test_output_below_a_regular_file_is_one_line(ray_local, pixel_ckpt, tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    (tmp_path / "file").write_text("a file where OUT's parent folder should be")
    for argv in (["upscale", str(tmp_path / "in"), str(tmp_path / "file" / "out"), "-m", pixel_ckpt, "-s", "2"],
                 ["prepare-data", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "file" / "out")]):
        assert _cli(*argv) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "Not a directory" in err[0] and str(tmp_path / "file" / "out") in err[0], err


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs mounted at tmp_path/disk (needs root and mount rights: skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_completes(ray_local, pixel_ckpt, tmp_path, small_disk):
    n = 8
    for i in range(n):
        _image(tmp_path / "in" / f"img{i}.png", 64, 48, seed=i)  # ~110 KB outputs: the disk holds two
    out = small_disk / "out"
    argv = _job("upscale", str(tmp_path / "in"), str(out), "-m", pixel_ckpt, "-s", "4", "--tile", "0",
                "--batch-size", "1", "--color-fix", "none", "--address", ray_local.get_runtime_context().gcs_address)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flowsr upscale: error: No space left on device"), done.stderr[-3000:]
    assert not (out / "manifest.parquet").exists()
    first = _outputs(out)
    assert len(first) < n
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    summary = upscale_corpus(UpscaleJobConfig(input=str(tmp_path / "in"), output=str(out), checkpoint=pixel_ckpt,
                                              scale=4, tile=0, batch_size=1, color_fix="none"))
    assert (summary["skipped"], summary["ok"], summary["error"]) == (len(first), n - len(first), 0)
    assert sorted(r["input"] for r in _manifest(summary["manifest"])) == sorted(
        str(tmp_path / "in" / f"img{i}.png") for i in range(n))


# ---- 3. a cluster address where nothing listens ----------------------------------------------------------
def test_a_dead_cluster_address_fails_in_one_line_before_the_output_is_touched(pixel_ckpt, tmp_path):
    _image(tmp_path / "in" / "a.png")
    runs = {job: (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                   env=_env()), time.monotonic())
            for job, argv in (
                ("upscale", _job("upscale", str(tmp_path / "in"), str(tmp_path / "up"), "-m", pixel_ckpt,
                                 "--address", "127.0.0.1:1")),
                ("prepare-data", _job("prepare-data", "--input", str(tmp_path / "in"), "--output",
                                      str(tmp_path / "pairs"), "--address", "127.0.0.1:1")),
                ("caption", _job("caption", "--shards", str(tmp_path / "in"), "--output", str(tmp_path / "captions"),
                                 "--address", "127.0.0.1:1")))}
    for job, (proc, start) in runs.items():
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{job} still waits for 127.0.0.1:1 after 90 s")
        assert time.monotonic() - start < 60
        assert proc.returncode == 2, err[-2000:]
        lines = _error_lines(err)
        assert len(lines) == 1 and f"{job}: error: --address 127.0.0.1:1: no Ray cluster answers" in lines[0], err
    assert not any((tmp_path / name).exists() for name in ("up", "pairs", "captions"))


# ---- 4. SIGINT and SIGTERM --------------------------------------------------------------------------
def test_a_stopped_job_leaves_its_tasks_to_ray_instead_of_cancelling_each(capsys):
    """Ray Data cancels its running tasks while a stopped driver unwinds, and in Ray 2.60 a cancel
    that crosses the task's reply aborts the driver (exit 1, a C++ stack; seen once in CI). While
    the job unwinds `ray.cancel` does nothing; after `run_job` returns it is Ray's own again."""
    import ray

    from jobs.common import run_job

    own = ray.cancel
    seen = {}

    def job():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        finally:
            seen["cancel"] = ray.cancel
            seen["result"] = ray.cancel("a task that is not there")

    assert run_job("demo", job) == 143
    assert seen["cancel"] is not own and seen["result"] is None
    assert ray.cancel is own
    assert "flowsr demo: stopped by SIGTERM" in capsys.readouterr().err


def _stop_when_written(argv, out, signum, more_than=0, timeout=300):
    """Run a job until OUT holds more than `more_than` outputs, send it `signum`, and return
    (exit status, stderr, seconds from the signal to its exit)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while (not out.exists() or len(_outputs(out)) <= more_than) and proc.poll() is None:
            assert time.monotonic() < deadline, "no output appeared"
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be stopped"
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_completes_each_input_once(ray_local, pixel_ckpt, tmp_path):
    """Ctrl-C gave a 91-line KeyboardInterrupt traceback and a manifest.parquet of part of the
    inputs; SIGTERM ended in Ray's abort handler (exit 134). Now: one line, 130 / 143, the
    committed parts kept and no manifest; the next run finishes each input exactly once."""
    n = 32
    for i in range(n):
        _image(tmp_path / "in" / f"img{i:02d}.png", 96, 96, seed=i)
    out = tmp_path / "out"
    argv = _job("upscale", str(tmp_path / "in"), str(out), "-m", pixel_ckpt, "-s", "4", "--tile", "0",
                "--batch-size", "1", "--color-fix", "none")
    code, err, seconds = _stop_when_written([*argv, "--address", ray_local.get_runtime_context().gcs_address],
                                            out, signal.SIGINT)
    print(f"SIGINT: exit {code} {seconds:.1f} s after the signal")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and seconds < 20, (seconds, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("flowsr upscale: stopped by SIGINT"), err[-3000:]
    assert not (out / naming.MANIFEST_NAME).exists()
    parts = upscale_manifest.read_manifest_parts(str(out / naming.PARTS_DIR)).to_pylist()
    written = _outputs(out)
    ok = {r["output"] for r in parts if r["status"] == "ok"}
    assert written and {os.fsencode(str(out)) + b"/" + p for p in written} <= {os.fsencode(o) for o in ok}

    code, err, seconds = _stop_when_written(argv, out, signal.SIGTERM, more_than=len(written))  # its own Ray
    print(f"SIGTERM (own local Ray): exit {code} {seconds:.1f} s after the signal")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and seconds < 30, (seconds, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("flowsr upscale: stopped by SIGTERM"), err[-3000:]
    assert not (out / naming.MANIFEST_NAME).exists()
    before = len(_outputs(out))
    assert len(written) < before < n

    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    summary = upscale_corpus(UpscaleJobConfig(input=str(tmp_path / "in"), output=str(out), checkpoint=pixel_ckpt,
                                              scale=4, tile=0, batch_size=1, color_fix="none"))
    assert (summary["skipped"], summary["ok"], summary["error"]) == (before, n - before, 0)
    inputs = [r["input"] for r in _manifest(summary["manifest"])]
    assert sorted(inputs) == sorted(str(tmp_path / "in" / f"img{i:02d}.png") for i in range(n))  # each once


# ---- 5. one exit-status rule ---------------------------------------------------------------------
def test_every_job_with_error_rows_follows_one_exit_status_rule(ray_local, pixel_ckpt, tmp_path, capsys):
    """prepare-data exited 0 with error rows while upscale exited 1. Both now: 1 when inputs
    failed, 0 with --allow-errors, 0 when the only rows besides the results are unsupported files."""
    _image(tmp_path / "in" / "good.png", 40, 48)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    _image(tmp_path / "clean" / "good.png", 40, 48)
    (tmp_path / "clean" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    prepare = ["prepare-data", "--patch-size", "32", "--degradation", "bicubic"]
    upscale = ["-m", pixel_ckpt, "-s", "2", "--tile", "0"]
    assert _cli(*prepare, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "p1")) == 1
    assert _cli(*prepare, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "p1"), "--allow-errors") == 0
    assert _cli(*prepare, "--input", str(tmp_path / "clean"), "--output", str(tmp_path / "p2")) == 0
    assert _cli("upscale", str(tmp_path / "in"), str(tmp_path / "u1"), *upscale) == 1
    assert _cli("upscale", str(tmp_path / "in"), str(tmp_path / "u1"), *upscale, "--allow-errors") == 0
    assert _cli("upscale", str(tmp_path / "clean"), str(tmp_path / "u2"), *upscale) == 0
    # evaluate: a pair that cannot be scored (LR not HR / 2) is a failed input like the others
    for d in ("hr", "lr", "sr"):
        (tmp_path / d).mkdir()
    for name, lr_size in (("ok", (20, 24)), ("bad", (9, 9))):
        _image(tmp_path / "hr" / f"{name}.png", 40, 48)
        _image(tmp_path / "sr" / f"{name}.png", 40, 48)
        _image(tmp_path / "lr" / f"{name}.png", *lr_size)
    evaluate = ["evaluate", "--data", str(tmp_path / "hr"), "--lr-dir", str(tmp_path / "lr"), "--scale", "2",
                "--sr", f"mine={tmp_path / 'sr'}", "--metrics", "--out"]
    assert _cli(*evaluate, str(tmp_path / "e1")) == 1
    assert _cli(*evaluate, str(tmp_path / "e1"), "--allow-errors") == 0
    capsys.readouterr()


# ---- 6. no working folders after a finished run -----------------------------------------------------------
def test_finished_runs_leave_no_working_folders(ray_local, pixel_ckpt, tmp_path):
    from jobs.prepare_data import PrepareConfig, prepare
    from jobs.upscale import upscale_corpus
    from pipeline.upscale_config import UpscaleJobConfig

    _image(tmp_path / "in" / "a.png", 40, 48)
    upscale_corpus(UpscaleJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "up"), checkpoint=pixel_ckpt,
                                    scale=2, tile=0))
    assert _tree(tmp_path / "up") == [b"_run.json", b"a.png", b"manifest.parquet"]
    prepare(PrepareConfig(input=str(tmp_path / "in"), output=str(tmp_path / "pairs"), patch_size=32,
                          degradation="bicubic"))
    top = {p for p in _tree(tmp_path / "pairs") if b"/" not in p}
    assert top == {b"README.md", b"_run.json", b"manifest.json", b"shards"}


def test_prepare_data_stopped_by_sigterm_keeps_its_shards_and_the_rerun_writes_each_pair_once(
        ray_local, tmp_path):
    """The same for the data stage: 143 and one line, no manifest.json of an unfinished run, the
    committed shards kept, and a rerun that writes each sample_id exactly once."""
    from jobs.prepare_data import PrepareConfig, prepare

    n = 40
    for i in range(n):
        _image(tmp_path / "in" / f"img{i:02d}.png", 64, 64, seed=i)
    out = tmp_path / "pairs"
    shards = lambda: sorted((out / "shards").glob("part-*.parquet")) if (out / "shards").exists() else []
    argv = _job("prepare-data", "--input", str(tmp_path / "in"), "--output", str(out), "--patch-size", "32",
                "--shard-rows", "2", "--files-per-task", "1", "--address", ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 300
        while not shards() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and shards(), "the job finished (or wrote nothing) before it could be stopped"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"prepare-data SIGTERM: exit {proc.returncode} {time.monotonic() - sent:.1f} s after the signal")
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("flowsr prepare-data: stopped by SIGTERM"), err[-3000:]
    assert not (out / "manifest.json").exists()
    kept = pq.read_table(out / "shards", columns=["sample_id"]).num_rows
    assert 0 < kept < n
    summary = prepare(PrepareConfig(input=str(tmp_path / "in"), output=str(out), patch_size=32, shard_rows=2,
                                    files_per_task=1))
    ids = pq.read_table(out / "shards", columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == n and summary["pairs_written"] == n - kept
    assert (out / "manifest.json").exists() and not (out / "_work").exists()
