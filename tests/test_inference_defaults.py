"""Inference defaults that use the node: one model actor per GPU of the cluster unless a pool size
is given, and the Qwen2-VL captioner loaded straight onto its device (no host copy first)."""
import pytest
import torch

from jobs import caption as caption_job
from jobs import upscale as upscale_job
from pipeline import caption as C
from pipeline.actors import gpu_pool_size
from pipeline.qwen_offline import build_qwen2vl


@pytest.mark.parametrize("cluster, num_gpus, pool_size, expected", [
    ({"CPU": 128.0, "GPU": 8.0}, 1.0, None, 8),  # one actor per GPU
    ({"CPU": 128.0, "GPU": 16.0}, 1.0, None, 16),  # two nodes of 8
    ({"CPU": 128.0, "GPU": 8.0}, 0.5, None, 16),  # two actors share a GPU
    ({"CPU": 128.0, "GPU": 8.0}, 3.0, None, 2),  # whole actors only: 8 // 3
    ({"CPU": 128.0, "GPU": 1.0}, 0.1, None, 10),  # 1 / 0.1 is 9.999... in floating point
    ({"CPU": 128.0, "GPU": 8.0}, 1.0, 3, 3),  # a given size wins
    ({"CPU": 128.0}, 1.0, None, 1),  # no GPU yet (an autoscaling cluster): at least one
    ({"CPU": 128.0, "GPU": 8.0}, 0.0, None, 1),  # CPU actors
])
def test_gpu_pool_size_one_actor_per_gpu(cluster, num_gpus, pool_size, expected):
    assert gpu_pool_size(pool_size, num_gpus, cluster) == expected


def test_upscale_and_caption_clis_size_the_pool_by_the_cluster_unless_told():
    from jobs.common import job_parser

    p = job_parser("upscale", upscale_job)
    args = p.parse_args(["-i", "in", "-o", "out", "-m", "ckpt", "--num-gpus", "1"])
    cfg = upscale_job.config_from_args(args)
    assert cfg.pool_size is None and gpu_pool_size(cfg.pool_size, cfg.num_gpus, {"GPU": 8.0}) == 8
    told = upscale_job.config_from_args(p.parse_args(["-i", "in", "-o", "out", "-m", "ckpt", "--pool-size", "2"]))
    assert gpu_pool_size(told.pool_size, 1.0, {"GPU": 8.0}) == 2
    with pytest.raises(ValueError, match="pool_size"):
        upscale_job.config_from_args(p.parse_args(["-i", "in", "-o", "out", "-m", "ckpt", "--pool-size", "0"]))

    cap = caption_job.config_from_args(job_parser("caption", caption_job).parse_args(
        ["--shards", "s", "--output", "o", "--backend", "qwen2vl", "--num-gpus", "1"])).caption
    assert cap.pool_size is None and gpu_pool_size(cap.pool_size, cap.num_gpus, {"GPU": 4.0}) == 4
    with pytest.raises(ValueError, match="pool_size"):
        C.CaptionConfig(backend="qwen2vl", pool_size=0)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_qwen2vl(str(tmp_path_factory.mktemp("qwen2vl-tiny")), size="tiny")


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta stands in for cuda
def test_qwen2vl_loads_straight_onto_its_device(tiny_qwen, device, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    calls = []
    load = Qwen2VLForConditionalGeneration.from_pretrained.__func__

    def recording(cls, *args, **kwargs):  # the real loader, its arguments recorded
        calls.append(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "from_pretrained", classmethod(recording))
    cfg = C.CaptionConfig(backend="qwen2vl", model=tiny_qwen, num_gpus=0, device=device, dtype="bfloat16")
    backend = C.Qwen2VLBackend.load(cfg)
    model = backend.model
    assert len(calls) == 1 and calls[0]["device_map"] == device and calls[0]["dtype"] == torch.bfloat16
    params = list(model.parameters())
    assert params and {p.device.type for p in params} == {device} and {p.dtype for p in params} == {torch.bfloat16}
    # the batch preparation hands the model its inputs on the model's device
    from PIL import Image

    inputs = backend.inputs([Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))], "Describe the image.")
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 3 and {t.device.type for t in tensors} == {device}
