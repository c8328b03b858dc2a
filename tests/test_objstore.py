"""The output layer and the jobs on an object store: `s3://` URIs against a local S3-compatible
server (moto's server mode on 127.0.0.1, `tests/s3_server.py`), started once for this module.

What must hold there as on a local disk: parts appear whole or not at all, one writer per output
(exact, through S3's conditional writes), a killed run resumes with each item written once, and
a rerun with other settings is refused.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "flowsr-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server with one bucket; AWS_ENDPOINT_URL and credentials point every client
    (pyarrow, boto3, the Ray workers and job subprocesses started afterwards) at it, and
    FLOWSR_CACHE (where remote checkpoints are copied) at a folder of this module's."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "s3_server.py"), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "FLOWSR_CACHE": str(tmp_path_factory.mktemp("remote-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_s3(s3, request):
    """The module's local Ray, started after the S3 settings so that its workers have them."""
    return request.getfixturevalue("ray_local")


_counter = iter(range(10**6))


@pytest.fixture
def prefix(s3):
    """A fresh `s3://` prefix for one test."""
    return f"s3://{BUCKET}/t{next(_counter)}"


def keys(s3, uri: str) -> list:
    """Keys under `uri` (relative to it), directory markers left out."""
    root = uri.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/"
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=root):
        found += [o["Key"][len(root):] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return sorted(found)


def put(s3, uri: str, data: bytes) -> None:
    bucket, key = uri.split("://", 1)[1].split("/", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def get(s3, uri: str) -> bytes:
    bucket, key = uri.split("://", 1)[1].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# ---- the store's primitives ---------------------------------------------------------------------
def test_server_honours_conditional_writes(s3, prefix):
    """What the lease stands on, asked of the server itself: If-None-Match: * creates once,
    If-Match replaces or deletes only the version named."""
    from botocore.exceptions import ClientError

    bucket, key = f"{prefix}/k".split("://", 1)[1].split("/", 1)
    first = s3.put_object(Bucket=bucket, Key=key, Body=b"a", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"b", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"c", IfMatch='"0123"')
    assert s3.put_object(Bucket=bucket, Key=key, Body=b"d", IfMatch=first)["ETag"] != first
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.delete_object(Bucket=bucket, Key=key, IfMatch=first)
    assert get(s3, f"{prefix}/k") == b"d"


def test_versioned_store_create_once_and_compare_and_swap(s3, prefix):
    from pipeline.storage import resolve_fs, versioned_store

    fs, path = resolve_fs(f"{prefix}/obj")
    store = versioned_store(fs)
    assert store is not None and versioned_store(pafs.LocalFileSystem()) is None
    v1 = store.create_if_absent(path, b"one")
    assert v1 and store.create_if_absent(path, b"two") is None and store.read(path) == (b"one", v1)
    v2 = store.replace_if_version(path, b"three", v1)
    assert v2 and v2 != v1 and store.replace_if_version(path, b"four", v1) is None
    assert store.read(path) == (b"three", v2)
    assert not store.delete_if_version(path, v1) and store.delete_if_version(path, v2)
    assert store.read(path) is None and store.replace_if_version(path, b"x", v2) is None


def test_atomic_parts_on_s3(s3, prefix):
    """A part appears whole or not at all: a write that fails half-way leaves no part and no
    temporary object (pyarrow would commit the half-written object on close: the temporary
    name and the move keep it from ever being a part); what a killed writer leaves is never
    listed as a part and is removed by clear_tmp."""
    from pipeline import output as out
    from pipeline.storage import resolve_fs

    fs, root = resolve_fs(prefix)
    table = pa.table({"id": [f"{i:04d}" for i in range(100)]})
    out.write_parquet_atomic(fs, f"{root}/parts/part-1.parquet", table)

    def broken(stream):
        stream.write(b"PAR1 half a part")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        out.atomic_write(fs, f"{root}/parts/part-2.parquet", broken)
    assert keys(s3, prefix) == ["parts/part-1.parquet"]
    put(s3, f"{prefix}/parts/{out.TMP_PREFIX}0123-part-3.parquet", b"PAR1 truncated")
    assert [p.rsplit("/", 1)[-1] for p in out.list_parts(fs, f"{root}/parts")] == ["part-1.parquet"]
    with fs.open_input_file(f"{root}/parts/part-1.parquet") as f:
        assert pq.read_table(f).equals(table)
    assert out.clear_tmp(fs, root) == 1 and keys(s3, prefix) == ["parts/part-1.parquet"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_first_runs_record_one_setting_and_refuse_the_others(s3, prefix, tmp_path, where):
    """The run record is created only if absent: of first runs that start together with
    different settings (a training run holds no lease), exactly one records its settings and
    runs, the others are refused as reruns with other settings; the record is the winner's."""
    from pipeline import output as out
    from pipeline.storage import resolve_fs

    for round_ in range(3):
        fs, root = resolve_fs(f"{prefix}/r{round_}" if where == "s3" else str(tmp_path / f"r{round_}"))
        barrier, results = threading.Barrier(6), {}

        def first_run(seed):
            record = out.run_record("train", "in", {"seed": seed})
            barrier.wait()
            try:
                results[seed] = out.check_run_record(fs, root, record, label="RUN")
            except out.RunMismatch:
                results[seed] = "refused"

        threads = [threading.Thread(target=first_run, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [seed for seed, result in results.items() if result is False]
        assert len(winners) == 1 and sorted(map(str, results.values())) == ["False"] + ["refused"] * 5, results
        assert out.read_json(fs, f"{root}/{out.RUN_FILE}")["params"] == {"seed": winners[0]}
        assert not [i for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith(out.TMP_PREFIX)]


# ---- the lease ----------------------------------------------------------------------------------
def test_lease_on_s3_one_of_many_racing_writers(s3, prefix):
    """Eight runs open the same output at once, three times over: exactly one holds it each
    time, the others refuse with OutputBusy; the holder's release frees it."""
    from pipeline import output as out

    record = out.run_record("job", "in", {})
    for round_ in range(3):
        uri = f"{prefix}/r{round_}"
        barrier, results = threading.Barrier(8), []
        gate = threading.Event()

        def contender():
            barrier.wait()
            try:
                with out.open_output(uri, record):
                    results.append("held")
                    gate.wait(10)
            except out.OutputBusy:
                results.append("busy")

        threads = [threading.Thread(target=contender) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(results) < 8 and time.monotonic() < deadline:
            if results.count("busy") == 7:
                break
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(30)
        assert sorted(results) == ["busy"] * 7 + ["held"], results
        assert out.LEASE_FILE not in keys(s3, uri)  # released


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_on_s3_stale_takeover_heartbeat_and_loss(s3, prefix):
    """A killed run's lease (same host, dead pid) is taken over by exactly one of two takers;
    a live one is never touched; the heartbeat refreshes only the version it wrote, and a holder
    whose lease was taken over stops and says so (`lost`) instead of overwriting it."""
    from pipeline import output as out
    from pipeline.lease import Lease
    from pipeline.storage import resolve_fs

    fs, root = resolve_fs(prefix)
    lease_uri = f"{prefix}/{out.LEASE_FILE}"
    killed = {"token": "killed", "host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": time.time(),
              "ttl_s": 600}
    put(s3, lease_uri, json.dumps(killed).encode())
    takers = [Lease(fs, root, "OUT") for _ in range(2)]
    results, barrier = [], threading.Barrier(2)

    def take(lease):
        barrier.wait()
        try:
            results.append(lease.acquire())
        except out.OutputBusy:
            results.append(None)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and json.loads(get(s3, lease_uri))["token"] == winners[0].token
    winners[0].release()
    assert out.LEASE_FILE not in keys(s3, prefix)

    live = {"token": "live", "host": "another-host", "pid": 1, "heartbeat": time.time(), "ttl_s": 600}
    put(s3, lease_uri, json.dumps(live).encode())
    with pytest.raises(out.OutputBusy, match="in use by another run"):
        Lease(fs, root, "OUT").acquire()
    assert json.loads(get(s3, lease_uri)) == live
    s3.delete_object(Bucket=BUCKET, Key=lease_uri.split(f"{BUCKET}/", 1)[1])

    lease = Lease(fs, root, "OUT", ttl_s=0.4).acquire()
    try:
        first = json.loads(get(s3, lease_uri))["heartbeat"]
        time.sleep(0.35)
        assert json.loads(get(s3, lease_uri))["heartbeat"] > first and not lease.lost
        thief = {"token": "thief", "host": "another-host", "pid": 1, "heartbeat": time.time(), "ttl_s": 600}
        put(s3, lease_uri, json.dumps(thief).encode())  # taken over while this holder still runs
        time.sleep(0.35)
        assert lease.lost and json.loads(get(s3, lease_uri)) == thief
    finally:
        lease.release()
    assert json.loads(get(s3, lease_uri)) == thief  # a lost lease is not deleted by its old holder


def test_lease_on_s3_holds_when_a_conditional_write_answer_is_lost(s3, prefix):
    """A conditional write that succeeded but whose answer was lost is retried by the client and
    fails against its own success: the lease is still this run's (same token), so it is
    acquired, refreshed and released as usual, never reported as busy or lost."""
    from pipeline import output as out
    from pipeline.lease import Lease
    from pipeline.storage import resolve_fs

    class AnswerLost:
        def __init__(self, store):
            self.store = store

        def create_if_absent(self, path, data):
            self.store.create_if_absent(path, data)
            return None

        def replace_if_version(self, path, data, version):
            self.store.replace_if_version(path, data, version)
            return None

        def __getattr__(self, name):
            return getattr(self.store, name)

    fs, root = resolve_fs(prefix)
    lease_uri = f"{prefix}/{out.LEASE_FILE}"
    lease = Lease(fs, root, "OUT", ttl_s=0.4)
    lease._store = AnswerLost(lease._store)
    lease.acquire()
    try:
        first = json.loads(get(s3, lease_uri))
        time.sleep(0.35)
        again = json.loads(get(s3, lease_uri))
        assert again["token"] == first["token"] == lease.token and again["heartbeat"] > first["heartbeat"]
        assert not lease.lost
    finally:
        lease.release()
    assert out.LEASE_FILE not in keys(s3, prefix)

# ---- the jobs -----------------------------------------------------------------------------------
def _png(seed: int, height: int = 72, width: int = 88) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 40 * seed % 255)], -1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _listing(uri: str):
    """What a job has committed under `uri` (for `run_until_killed` to see it settle)."""
    from pipeline.storage import resolve_fs

    fs, root = resolve_fs(uri)
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)))


def _read_parquet(uri: str) -> pa.Table:
    from pipeline.output import list_parts
    from pipeline.storage import resolve_fs

    fs, root = resolve_fs(uri)
    tables = []
    for path in list_parts(fs, root):
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else pa.table({})


def _env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _one_line_refusal(capsys, run, words: str) -> None:
    """`run()` (a job's CLI entry) refuses with exit status 2 and `words` in its last stderr line,
    without a traceback."""
    capsys.readouterr()  # what earlier steps printed
    code = run()
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err.splitlines()[-1] and "Traceback" not in err, err


PREPARE_KILL_SCRIPT = """
import os, signal, sys, threading, time
import pyarrow.fs as pafs
from jobs.prepare_data import PrepareConfig, prepare
from pipeline.storage import resolve_fs
cfg = PrepareConfig(**{cfg!r})
fs, root = resolve_fs(cfg.output + "/shards")
def kill_after_first_shard():  # the degrade tasks commit the shards: watch them land
    while not any(i.base_name.startswith("part-")
                  for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))):
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill of the job, mid-run
threading.Thread(target=kill_after_first_shard, daemon=True).start()
prepare(cfg)
"""


@pytest.fixture(scope="module")
def prepared(s3, ray_s3, run_until_killed_module):
    """prepare-data from s3:// photos to s3:// pairs (an output inside the input prefix, which
    the listing must leave out), SIGKILLed after its first shard, then rerun: (config, the sample
    ids of the killed run's shards, the rerun's summary)."""
    from jobs import prepare_data as P

    photos = f"s3://{BUCKET}/photos"
    for i in range(8):
        put(s3, f"{photos}/img{i:02d}.png", _png(i))
    cfg = P.PrepareConfig(input=photos, output=f"{photos}/pairs", patch_size=32, crops_per_image=2,
                          shard_rows=2, files_per_task=1, address=ray_s3.get_runtime_context().gcs_address)
    from dataclasses import asdict

    proc = run_until_killed_module([sys.executable, "-c", PREPARE_KILL_SCRIPT.format(cfg=asdict(cfg))],
                                   lambda: _listing(cfg.output), cwd=REPO, env=_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    committed = keys(s3, cfg.output)
    shards = [k for k in committed if k.startswith("shards/part-")]
    assert "_lease.json" in committed and "manifest.json" not in committed  # left by the killed run
    assert 1 <= len(shards) < 8, f"the run was not interrupted part-way: {committed}"
    # what a writer killed between its upload and its move leaves: readers and the rerun ignore it
    put(s3, f"{cfg.output}/shards/.tmp-0123-part-partial.parquet", b"PAR1 truncated")
    before = _read_parquet(f"{cfg.output}/shards").column("sample_id").to_pylist()
    summary = P.prepare(cfg)
    return cfg, before, summary


@pytest.fixture(scope="module")
def run_until_killed_module():
    from conftest import _run_until_killed

    return _run_until_killed


def test_prepare_data_on_s3_resumes_after_sigkill_with_each_pair_once(s3, prepared):
    cfg, before, summary = prepared
    ids = _read_parquet(f"{cfg.output}/shards").column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 16 and set(before) <= set(ids)
    assert summary["resumed"] and summary["pairs_written"] == 16 - len(before) and summary["total_pairs"] == 16
    assert summary["sources"] == 8 and summary["total_errors"] == 0  # the output's own files are not inputs
    committed = keys(s3, cfg.output)
    assert not [k for k in committed if ".tmp-" in k or k.startswith(("_work/", "_resume/"))], committed
    assert "_lease.json" not in committed  # the rerun took the killed run's lease over and released it
    manifest = json.loads(get(s3, f"{cfg.output}/manifest.json"))
    assert manifest["total_rows"] == 16 and sorted(s["path"] for s in manifest["shards"]) == sorted(
        k for k in committed if k.startswith("shards/part-"))


def test_prepare_data_on_s3_refuses_a_concurrent_run_and_other_settings(s3, prepared, capsys):
    from jobs import prepare_data as P
    from pipeline.lease import Lease
    from pipeline.storage import resolve_fs

    cfg = prepared[0]
    before = keys(s3, cfg.output)
    argv = ["--input", cfg.input, "--output", cfg.output, "--patch-size", "32", "--crops-per-image", "2",
            "--shard-rows", "2", "--files-per-task", "1", "--address", cfg.address]
    fs, root = resolve_fs(cfg.output)
    with Lease(fs, root, cfg.output):  # another run, live, holds the output
        _one_line_refusal(capsys, lambda: P.main(argv), "in use by another run")
    _one_line_refusal(capsys, lambda: P.main([*argv, "--seed", "1"]), "seed: 0 -> 1")
    assert keys(s3, cfg.output) == before  # a refused run writes nothing


CAPTION_KILL_SCRIPT = """
import os, signal
from jobs.caption import RegenerateConfig, regenerate
from pipeline.caption import CaptionConfig
cfg = RegenerateConfig(shards={shards!r}, output={output!r}, caption=CaptionConfig(backend="template"),
                       address={address!r})
regenerate(cfg, on_part=lambda index, row: os.kill(os.getpid(), signal.SIGKILL))  # at the first part
"""


def test_caption_on_s3_resumes_after_sigkill_refuses_concurrent_and_other_settings(
        s3, prepared, ray_s3, run_until_killed_module, capsys):
    """caption (template) from s3:// shards into an s3:// caption table: SIGKILLed when its first
    part is committed, rerun: every pair captioned exactly once; a second run while one holds
    the output, and a rerun with another backend, are refused in one line."""
    from jobs import caption as C
    from pipeline.lease import Lease
    from pipeline.caption import CaptionConfig
    from pipeline.storage import resolve_fs

    shards = f"{prepared[0].output}/shards"
    output = f"s3://{BUCKET}/captions"
    address = ray_s3.get_runtime_context().gcs_address
    script = CAPTION_KILL_SCRIPT.format(shards=shards, output=output, address=address)
    proc = run_until_killed_module([sys.executable, "-c", script], lambda: _listing(output), cwd=REPO,
                                   env=_env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = [k for k in keys(s3, output) if k.startswith("part-")]
    assert 1 <= len(killed) and "_lease.json" in keys(s3, output)
    cfg = C.RegenerateConfig(shards=shards, output=output, caption=CaptionConfig(backend="template"),
                             address=address)
    summary = C.regenerate(cfg)
    pairs = _read_parquet(shards).column("sample_id").to_pylist()
    captioned = _read_parquet(output).column("sample_id").to_pylist()
    assert sorted(captioned) == sorted(pairs) and len(pairs) == 16  # each pair once
    assert summary["captioned"] == 16 - summary["already_captioned"] and summary["already_captioned"] >= 2
    assert summary["parts"] == 8 - len(killed)
    assert not [k for k in keys(s3, output) if ".tmp-" in k or k == "_lease.json"]

    argv = ["--shards", shards, "--output", output, "--backend", "template", "--address", address]
    before = keys(s3, output)
    fs, root = resolve_fs(output)
    with Lease(fs, root, output):
        _one_line_refusal(capsys, lambda: C.main(argv), "in use by another run")
    _one_line_refusal(capsys, lambda: C.main([*argv[:-4], "--backend", "qwen2vl", *argv[-2:]]),
                      "backend: 'template' -> 'qwen2vl'")
    assert keys(s3, output) == before


def test_upscale_on_s3_resumes_after_sigkill_refuses_concurrent_and_other_settings(
        s3, ray_s3, pixel_ckpt, run_until_killed_module, upscale_killed_at_first_output, capsys):
    """upscale from s3:// images to an s3:// output inside the input prefix: SIGKILLed when its first written batch
    reaches the driver; what exists then is complete and has its manifest row; the rerun (with
    the checkpoint read from s3:// this time) skips exactly those, writes the rest once and lists
    each input once. A second run while one holds
    the output, and a rerun with another colour fix, are refused in one line."""
    from jobs import upscale as U
    from pipeline import image_codecs, naming, upscale_manifest
    from pipeline.lease import Lease
    from pipeline.storage import resolve_fs
    from pipeline.upscale_config import UpscaleJobConfig

    n = 12
    source = f"s3://{BUCKET}/photos-lr"
    output = f"{source}/x2"  # inside the input prefix: the listing must leave it out
    names = [f"img{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        put(s3, f"{source}/{name}", _png(i, 24, 32))
    address = ray_s3.get_runtime_context().gcs_address
    argv = ["--input", source, "--output", output, "--checkpoint", pixel_ckpt, "--scale", "2", "--batch-size", "1",
            "--tile", "0", "--num-gpus", "0", "--address", address]
    proc = run_until_killed_module([sys.executable, "-c", upscale_killed_at_first_output, *argv], lambda: _listing(output),
                                   cwd=REPO, env=_env(), timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    first = [k for k in keys(s3, output) if k.startswith("img")]
    assert 1 <= len(first) < n, f"{len(first)} of {n} outputs before the kill"
    assert all(image_codecs.is_valid_output(f"{output}/{name}", (48, 64)) for name in first)  # whole, never partial
    parts = upscale_manifest.read_manifest_parts(f"{output}/{naming.PARTS_DIR}").to_pylist()
    recorded = {r["output"]: r["status"] for r in parts}
    assert all(recorded[f"{output}/{name}"] == "ok" for name in first)  # each has its row
    etags = {name: s3.head_object(Bucket=BUCKET, Key=f"photos-lr/x2/{name}")["ETag"] for name in first}

    # the rerun reads the same checkpoint from the store: recorded by content, it is the same run
    remote_ckpt = f"s3://{BUCKET}/checkpoints/pixel"
    pafs.copy_files(pixel_ckpt, remote_ckpt.split("://", 1)[1], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=resolve_fs(remote_ckpt)[0])
    cfg = UpscaleJobConfig(input=source, output=output, checkpoint=remote_ckpt, scale=2, batch_size=1, tile=0,
                           num_gpus=0, address=address)
    summary = U.upscale_corpus(cfg)
    assert os.listdir(os.environ["FLOWSR_CACHE"])  # the upscaler actor copied the checkpoint from the store
    assert summary["skipped"] == len(first) and summary["ok"] == n - len(first) and summary["error"] == 0
    assert {name: s3.head_object(Bucket=BUCKET, Key=f"photos-lr/x2/{name}")["ETag"] for name in first} == etags
    assert [k for k in keys(s3, output) if not k.startswith("_")] == sorted(["manifest.parquet", *names])
    with resolve_fs(summary["manifest"])[0].open_input_file(resolve_fs(summary["manifest"])[1]) as f:
        inputs = pq.read_table(f).column("input").to_pylist()
    assert sorted(inputs) == [f"{source}/{name}" for name in names]  # each input exactly once
    assert all(image_codecs.is_valid_output(f"{output}/{name}", (48, 64)) for name in names)
    assert not [k for k in keys(s3, output) if k.startswith((naming.TMP_DIR, naming.PARTS_DIR, "_lease"))]

    before = keys(s3, output)
    fs, root = resolve_fs(output)
    with Lease(fs, root, output):
        _one_line_refusal(capsys, lambda: U.main(argv), "in use by another run")
    _one_line_refusal(capsys, lambda: U.main([*argv, "--color-fix", "adain"]), "color_fix: 'wavelet' -> 'adain'")
    assert keys(s3, output) == before


@pytest.mark.slow
def test_train_checkpoints_on_s3_resume_and_refuse_other_settings(s3, ray_s3, capsys):
    """Training with an s3:// storage path and s3:// shards: Ray Train persists its checkpoints
    there, an injected worker failure resumes from the last one (read back from the store), a
    rerun finds the stage finished, and a rerun with another learning rate is refused in one line."""
    from flowsr.checkpoint import read_meta
    from flowsr.config import resolve
    from flowsr.metrics_log import read_csv
    from jobs.train import main, train
    from test_train import make_pairs

    data = f"s3://{BUCKET}/train-shards"
    fs, root = pafs.FileSystem.from_uri(data)
    with fs.open_output_stream(f"{root}/part-00000.parquet") as f:
        pq.write_table(make_pairs(8), f)
    storage = f"s3://{BUCKET}/runs"
    overrides = ["model.pixel_channels=[8,16]", "optim.batch_size=2", "optim.stage1_steps=3", "train.num_workers=1",
                 "train.checkpoint_every=2", "train.fail_at_step=3", "train.max_failures=1", "train.log_every=1"]
    cfg = resolve("pixel-small", overrides)
    result = train(cfg, data, storage_path=storage, name="fault", stage=1)
    committed = keys(s3, f"{storage}/fault")
    assert "fault_injected_stage1_step3" in committed and "_run.json" in committed and "config.json" in committed
    assert {k.split("/")[1] for k in committed if k.startswith("stage1/checkpoint_step")} == {
        "checkpoint_step0000002", "checkpoint_step0000003"}
    assert read_meta(result["checkpoint"])["step"] == 3  # downloaded from the store
    rows = read_csv(result["metrics_csv"])
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and [int(r["resumed_from"]) for r in rows] == [0, 0, 2]

    again = train(cfg, data, storage_path=storage, name="fault", stage=1)  # the stage is finished: skipped
    assert read_meta(again["checkpoint"])["step"] == 3 and keys(s3, f"{storage}/fault") == committed
    argv = ["--config", "pixel-small", *[f"--set={o}" for o in overrides], "--set=optim.lr=0.5", "--data", data,
            "--storage-path", storage, "--name", "fault", "--stage", "1"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr:" in err.splitlines()[-1] and "Traceback" not in err, err
    assert keys(s3, f"{storage}/fault") == committed
