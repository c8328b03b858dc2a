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
def s3():
    """A local S3 server with one bucket; AWS_ENDPOINT_URL and credentials point every client
    (pyarrow, boto3, the Ray workers and job subprocesses started afterwards) at it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "s3_server.py"), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
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
    from pipeline.storage import resolve_fs

    fs, root = resolve_fs(prefix)
    lease_uri = f"{prefix}/{out.LEASE_FILE}"
    killed = {"token": "killed", "host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": time.time(),
              "ttl_s": 600}
    put(s3, lease_uri, json.dumps(killed).encode())
    takers = [out.Lease(fs, root, "OUT") for _ in range(2)]
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
        out.Lease(fs, root, "OUT").acquire()
    assert json.loads(get(s3, lease_uri)) == live
    s3.delete_object(Bucket=BUCKET, Key=lease_uri.split(f"{BUCKET}/", 1)[1])

    lease = out.Lease(fs, root, "OUT", ttl_s=0.4).acquire()
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
