"""The output layer: atomic parts, run record (pipeline/output.py), lease (pipeline/lease.py),
checkpoint digest (pipeline/fingerprint.py), the Ray-built resume index (pipeline/done_index.py)
and work listings (pipeline/listing.py)."""
import json
import os
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import output as out
from pipeline.done_index import EMPTY_INDEX, build_done_index
from pipeline.fingerprint import checkpoint_digest
from pipeline.lease import Lease
from pipeline.listing import MAX_UNITS_PER_TASK, TASKS_PER_CPU, ListingUnits, write_listing_chunks
from pipeline.storage import resolve_fs


def local(tmp_path):
    return resolve_fs(str(tmp_path))


def test_atomic_write_leaves_whole_file_or_nothing(tmp_path):
    fs, root = local(tmp_path)
    out.write_json_atomic(fs, f"{root}/a/b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}

    def broken(stream):
        stream.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        out.atomic_write(fs, f"{root}/a/c.parquet", broken)
    assert sorted(os.listdir(tmp_path / "a")) == ["b.json"]  # no partial, no temp file
    (tmp_path / "a" / f"{out.TMP_PREFIX}x-part-1.parquet").write_bytes(b"PAR1 half")
    out.write_parquet_atomic(fs, f"{root}/a/part-2.parquet", pa.table({"id": ["a"]}))
    assert [os.path.basename(p) for p in out.list_parts(fs, f"{root}/a")] == ["part-2.parquet"]
    assert out.clear_tmp(fs, root) == 1 and sorted(os.listdir(tmp_path / "a")) == ["b.json", "part-2.parquet"]


def test_run_record_refuses_other_settings_in_one_line(tmp_path):
    fs, root = local(tmp_path)
    record = out.run_record("prepare_data", "/in", {"seed": 0, "captioner": "off"})
    assert out.check_run_record(fs, root, record, label="OUT") is False  # first run: written
    moved = {**record, "input": "/moved/in", "code_version": "other"}  # recorded, not compared
    assert out.check_run_record(fs, root, moved, label="OUT") is True
    for changed, words in (({"params": {"seed": 1, "captioner": "off"}}, "seed: 0 -> 1"),
                           ({"params": {"seed": 0, "captioner": "template"}}, "captioner: 'off' -> 'template'"),
                           ({"checkpoint": "abc"}, "checkpoint"), ({"job": "caption"}, "job")):
        with pytest.raises(out.RunMismatch) as info:
            out.check_run_record(fs, root, {**record, **changed}, label="OUT")
        message = str(info.value)
        assert words in message and "--overwrite" in message and "\n" not in message
    assert json.loads((tmp_path / out.RUN_FILE).read_text())["params"] == {"seed": 0, "captioner": "off"}


def test_overwrite_clears_results_then_records_new_settings(tmp_path):
    first = out.run_record("job", "in", {"seed": 0})
    with out.open_output(str(tmp_path), first) as o:
        out.write_bytes_atomic(o.fs, o.path("shards", "part-1.parquet"), b"x")
    with pytest.raises(out.RunMismatch):
        with out.open_output(str(tmp_path), out.run_record("job", "in", {"seed": 1})):
            pass
    assert (tmp_path / "shards" / "part-1.parquet").exists()  # a refused run deletes nothing
    with out.open_output(str(tmp_path), out.run_record("job", "in", {"seed": 1}), overwrite=True) as o:
        assert not o.resumed and not (tmp_path / "shards").exists()
    assert json.loads((tmp_path / out.RUN_FILE).read_text())["params"] == {"seed": 1}
    assert not (tmp_path / out.LEASE_FILE).exists()  # released


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_one_writer_and_stale_takeover(tmp_path):
    fs, root = local(tmp_path)
    record = out.run_record("job", "in", {})
    with out.open_output(str(tmp_path), record):
        (tmp_path / f"{out.TMP_PREFIX}being-written").write_bytes(b"live writer")
        with pytest.raises(out.OutputBusy, match="in use by another run"):
            with out.open_output(str(tmp_path), record):
                pass
        assert (tmp_path / f"{out.TMP_PREFIX}being-written").exists()  # a refused run deletes nothing
    lease = tmp_path / out.LEASE_FILE
    stale = [{"token": "killed", "host": socket.gethostname(), "pid": _dead_pid(),
              "heartbeat": time.time(), "ttl_s": 600},  # same host, pid gone
             {"token": "lost-node", "host": "another-host", "pid": 1,
              "heartbeat": time.time() - 700, "ttl_s": 600}]  # heartbeat expired
    for body in stale:
        lease.write_text(json.dumps(body))
        with out.open_output(str(tmp_path), record) as o:
            held = json.loads(lease.read_text())
            assert held["pid"] == os.getpid() and held["token"] != body["token"] and o.resumed
        assert not lease.exists()
    live = {"token": "live", "host": "another-host", "pid": 1, "heartbeat": time.time(), "ttl_s": 600}
    lease.write_text(json.dumps(live))
    with pytest.raises(out.OutputBusy):
        with out.open_output(str(tmp_path), record):
            pass
    assert json.loads(lease.read_text()) == live  # never removed


def test_lease_heartbeat_refreshes(tmp_path):
    fs, root = local(tmp_path)
    with Lease(fs, root, "OUT", ttl_s=0.4):
        first = json.loads((tmp_path / out.LEASE_FILE).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / out.LEASE_FILE).read_text())["heartbeat"] > first


def test_checkpoint_digest_follows_content(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 1000)
    (ckpt / "config.json").write_text("{}")
    digest = checkpoint_digest(str(ckpt))
    assert digest == checkpoint_digest(str(ckpt)) and len(digest) == 64
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert checkpoint_digest(str(ckpt)) != digest
    with pytest.raises(out.OutputError, match="not found"):
        checkpoint_digest(str(tmp_path / "missing"))


@pytest.mark.parametrize("rows_per_bucket", [10_000, 7])
def test_done_index_from_committed_parts(tmp_path, ray_local, rows_per_bucket):
    """The index built in Ray Data answers membership like a plain set, bucket files hold each
    id once, and none holds more than its share."""
    rng = np.random.default_rng(0)
    done = [f"{i:016x}" for i in rng.integers(0, 2**62, 40)]
    with out.open_output(str(tmp_path / "o"), out.run_record("job", "in", {})) as o:
        for k in range(0, 40, 16):  # three parts, one id repeated across parts
            ids = done[k:k + 16] + [done[0]]
            out.write_parquet_atomic(o.fs, o.path("shards", f"part-{k}.parquet"), pa.table({"sample_id": ids}))
        parts = out.list_parts(o.fs, o.path("shards"))
        index = build_done_index(o, parts, "sample_id", "shards", rows_per_bucket=rows_per_bucket)
        assert index.buckets == (1 if rows_per_bucket > 100 else 43 // 7 + 1)
        queries = done[::3] + [f"{i:016x}" for i in rng.integers(0, 2**62, 30)]
        expected = np.array([q in set(done) for q in queries])
        assert np.array_equal(index.done(queries), expected) and expected.sum() == 14
        stored = pq.read_table(index.directory).column("id").to_pylist()
        assert sorted(stored) == sorted(set(done))
        for path in os.listdir(index.directory):
            bucket = int(path.split("-")[1].split(".")[0])
            ids = pq.read_table(os.path.join(index.directory, path)).column("id").to_pylist()
            assert all(zlib.crc32(i.encode()) % index.buckets == bucket for i in ids)
    assert not EMPTY_INDEX.done(["x"]).any()


@pytest.mark.parametrize("per_unit,chunk_rows,row_group", [(4, 10, 3), (3, 9, 9), (7, 5, 2)])
def test_listing_units_cover_the_listing_once_in_order(tmp_path, per_unit, chunk_rows, row_group):
    """Units are consecutive runs of `per_unit` rows within a chunk (the last of a chunk shorter),
    read back from the row groups that hold them; together they are the listing, in order."""
    import math

    fs, root = resolve_fs(str(tmp_path / "work"))
    names = [f"img{i:03d}.png" for i in range(23)]
    schema = pa.schema([("source_uri", pa.string())])
    chunks, counts = write_listing_chunks(fs, root, ({"source_uri": n} for n in names), schema,
                                              chunk_rows, row_group)
    assert counts == [chunk_rows] * (23 // chunk_rows) + ([23 % chunk_rows] if 23 % chunk_rows else [])
    assert all(pq.ParquetFile(c).metadata.num_row_groups == math.ceil(n / row_group)
               for c, n in zip(chunks, counts))
    units = ListingUnits(fs, chunks, counts, per_unit)
    # independent reference: cut each chunk's names into runs of per_unit
    expected = [names[start + k:start + min(k + per_unit, n)]
                for start, n in zip(np.cumsum([0] + counts[:-1]), counts) for k in range(0, n, per_unit)]
    assert units.count == len(expected)
    assert [units.rows_of(u).column("source_uri").to_pylist() for u in range(units.count)] == expected
    # all units in one pass (the reads shared between consecutive units), and a run that starts mid-chunk
    assert [t.column("source_uri").to_pylist() for t in units.iter_rows(range(units.count))] == expected
    assert [t.column("source_uri").to_pylist() for t in units.iter_rows(range(1, units.count))] == expected[1:]
    with pytest.raises(IndexError):
        units.rows_of(units.count)
    # runs: ~4 per CPU, at most one per unit, more when runs would pass MAX_UNITS_PER_TASK; each
    # unit in exactly one run, in order
    assert units.runs(1) == min(units.count, TASKS_PER_CPU)
    assert units.runs(64) == units.count
    for runs in (1, units.runs(1), units.count):
        assert [u for r in range(runs) for u in units.units_of_run(r, runs)] == list(range(units.count))
    many = ListingUnits(fs, chunks * 1000, counts * 1000, per_unit)
    assert many.runs(2) == math.ceil(many.count / MAX_UNITS_PER_TASK) > 2 * TASKS_PER_CPU
    assert max(len(many.units_of_run(r, many.runs(2))) for r in range(many.runs(2))) <= MAX_UNITS_PER_TASK

def test_listing_units_dataset_yields_every_unit_once(tmp_path, ray_local):
    fs, root = resolve_fs(str(tmp_path / "work"))
    chunks, counts = write_listing_chunks(fs, root, ({"source_uri": str(i)} for i in range(50)),
                                              pa.schema([("source_uri", pa.string())]), 20, 8)
    units = ListingUnits(fs, chunks, counts, 3)
    runs = units.runs(cluster_cpus=2)
    ds = units.dataset(runs).materialize()
    assert runs == 2 * TASKS_PER_CPU < units.count == 7 + 7 + 4
    assert sorted(r["id"] for r in ds.iter_rows()) == list(range(runs))
    assert ds.num_blocks() == runs  # one read task per run
