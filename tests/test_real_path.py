"""The path users run on GPUs, proven on the CPU: `meta` stands in for `cuda` (a tensor the loader
leaves behind raises), gloo workers stand in for NCCL ones (two workers must match one on the same
global batch), and the stage-2 step with every loss term under the options that fit memory
(UNet and VAE gradient checkpointing, a bf16 frozen base)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowsr.build import build_stage1, build_stage2, make_optimizer
from flowsr.config import ConfigError, apply_overrides
from flowsr.draws import StepDraws, is_flow_row
from flowsr.schedules import make_pair_sampler
from flowsr.tiny import tiny_config
from flowsr.train_step import StepMetrics, stage1_step, stage2_step
from flowsr.trainer import build_stage, wrap_ddp

META = torch.device("meta")
FULL = ["loss.lambda_adv=0.5", "loss.lambda_iqa=0.5", "loss.lambda_lpips=1.0", "optim.max_grad_norm=0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def stage1_dir(tiny_dir, tmp_path_factory):
    """A stage-1 checkpoint's student with a non-zero LoRA B (so every LoRA weight gets a gradient)."""
    cfg = tiny_config(tiny_dir)
    torch.manual_seed(0)
    s1 = build_stage1(cfg)
    for p in s1.student.trainable_parameters():
        p.data.normal_(0, 0.02)
    d = tmp_path_factory.mktemp("s1")
    s1.student.save_trainable(str(d / "student"))
    return str(d)


def batch(n, size=32, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    lr = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hr, 4), size=(size, size), mode="bicubic")
    out = {"hr": hr, "lr": lr, "hr_caption": [f"sharp photo {i}" for i in range(n)],
           "lr_caption": [f"blurry photo {i}" for i in range(n)]}
    if device is not None:
        out["hr"], out["lr"] = hr.to(device), lr.to(device)
    return out


# ---- meta stands in for cuda ---------------------------------------------------------------------
def test_every_stage_step_runs_on_the_device_the_loader_moved_to(tiny_dir, stage1_dir):
    """Build each stage on `meta` through the trainer's own loader, run its step with every loss
    term (flow, consistency, LPIPS, GAN and its discriminator step, CLIP quality alignment, EMA):
    a module or buffer left on the CPU (ClipIQA's mean / std were), or a host read of a loss
    value inside the step (`.item()` on meta raises), fails here."""
    cfg = tiny_config(tiny_dir, FULL)
    models, opts = build_stage(cfg, 1, META)
    m1 = stage1_step(batch(2, device=META), models, opts[0], cfg, StepDraws(0, 1, 0, 2, META))
    assert isinstance(m1, StepMetrics) and all(t.device.type == "meta" for t in m1.sums.values())

    models, opts = build_stage(cfg, 2, META, init_from=stage1_dir)
    assert models.iqa.mean.device.type == "meta" and models.disc is not None
    before = [p for p in models.target.parameters()]
    m2 = stage2_step(batch(2, device=META), models, opts, cfg, make_pair_sampler("fast_slow"),
                     StepDraws(0, 2, 0, 2, META))
    assert set(m2.sums) == {"flow", "cons", "adv", "iqa", "grad_norm", "disc"}
    assert all(t.device.type == "meta" for t in m2.sums.values())
    assert all(p.device.type == "meta" for p in before)


def test_clip_iqa_moves_whole_to_its_device(tiny_dir):
    from flowsr.perceptual import ClipIQA

    cfg = tiny_config(tiny_dir)
    iqa = ClipIQA.from_pretrained(cfg.loss.clip_arch, "", device=META)
    assert {b.device.type for b in iqa.buffers()} == {"meta"}
    x = torch.zeros(2, 3, 32, 32, device=META)
    assert iqa.image_features(x).shape == (2, 32) and iqa.text_features(["a", "b"]).device.type == "meta"


# ---- worker-count invariance -------------------------------------------------------------------
def _step(cfg, stage1_dir, rows, n_global, rank, world):
    """One stage-2 step on rows `rows` of the global batch; the LoRA and head gradients it applied."""
    torch.manual_seed(0)
    models = build_stage2(cfg, init_from=os.path.join(stage1_dir, "student"))
    wrap_ddp(models, torch.device("cpu"))
    grads = {}

    def recorder(name, params):
        opt = torch.optim.SGD(params, lr=0.0)
        step = opt.step

        def record(*a, **k):
            grads[name] = torch.cat([p.grad.flatten() for p in params]).tolist()
            return step(*a, **k)
        opt.step = record
        return opt

    params = models.student.trainable_parameters()
    opts = (recorder("lora", params), recorder("heads", list(models.disc.parameters())))
    full = batch(n_global)
    local = {k: v[rows.start:rows.stop] for k, v in full.items()}
    metrics = stage2_step(local, models, opts, cfg, make_pair_sampler("fast_slow"),
                          StepDraws(5, 2, 3, n_global, "cpu", rows))
    keys = sorted(metrics.sums)
    return {"metrics": metrics.read(across_ranks=True), "keys": keys, **grads}


def _worker(rank, world, init_file, tiny_dir, stage1_dir, cases, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for n_global, accum in cases:
            cfg = tiny_config(tiny_dir, [*FULL, f"optim.grad_accum={accum}", f"optim.batch_size={n_global}"])
            local = n_global // world
            results.append(_step(cfg, stage1_dir, range(rank * local, (rank + 1) * local), n_global, rank, world))
        with open(f"{out}.{rank}", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_match_one_on_the_same_global_batch(tiny_dir, stage1_dir, tmp_path):
    """Global batch 2 (one row per worker: at flow fraction 1/2 the flow rows were rounded to 0
    per worker and L_flow never trained) and 4 with grad_accum 2 (chunks of one row): the same
    loss terms, every term on every rank, and the same LoRA and discriminator-head gradients
    as one worker on the whole batch."""
    cases = [(2, 1), (4, 2)]
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg"), tiny_dir, stage1_dir, cases, str(tmp_path / "out")),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for i, (n_global, accum) in enumerate(cases):
        cfg = tiny_config(tiny_dir, [*FULL, f"optim.grad_accum={accum}", f"optim.batch_size={n_global}"])
        one = _step(cfg, stage1_dir, range(n_global), n_global, 0, 1)
        assert one["keys"] == ranks[0][i]["keys"] == ranks[1][i]["keys"] == ["adv", "cons", "disc", "flow",
                                                                            "grad_norm", "iqa"]
        for r in range(2):
            two = ranks[r][i]
            for k in ("flow", "cons", "adv", "iqa", "disc"):
                assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-6), (n_global, k)
            for name in ("lora", "heads"):
                a, b = torch.tensor(one[name]), torch.tensor(two[name])
                assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-3, atol=1e-6), (n_global, name)


def test_flow_rows_spread_over_batch_and_steps():
    """Flow fraction 1/2: every other row of the stream; a global batch of one alternates between
    L_flow and the consistency loss instead of never training L_flow (round(0.5) == 0)."""
    assert [is_flow_row(g, 0.5) for g in range(6)] == [False, True] * 3
    one_per_step = [StepDraws(0, 2, s, 1, "cpu").flow_rows(0.5) for s in range(4)]
    assert one_per_step == [([], [0]), ([0], []), ([], [0]), ([0], [])]
    for f in (0.25, 1 / 3, 0.5, 0.8):
        flows = sum(len(StepDraws(0, 2, s, 16, "cpu").flow_rows(f)[0]) for s in range(30))
        assert abs(flows - 30 * 16 * f) <= 1
    assert StepDraws(0, 2, 0, 4, "cpu").flow_rows(1.0) == ([0, 1, 2, 3], [])


# ---- options that fit memory -------------------------------------------------------------------
def _lora_grad_after_step(cfg, stage1_dir, seed=0):
    torch.manual_seed(0)
    models = build_stage2(cfg, init_from=os.path.join(stage1_dir, "student"))
    params = models.student.trainable_parameters()
    grads = []
    opt = torch.optim.SGD(params, lr=0.0)
    step = opt.step
    opt.step = lambda *a, **k: (grads.append(torch.cat([p.grad.flatten().float() for p in params])), step(*a, **k))
    opt_d = make_optimizer(models.disc.parameters(), 1e-3, cfg)
    stage2_step(batch(2), models, (opt, opt_d), cfg, make_pair_sampler("fast_slow"), StepDraws(seed, 2, 0, 2, "cpu"))
    return grads[0]


def test_unet_and_vae_gradient_checkpointing_with_the_gan_term(tiny_dir, stage1_dir):
    """With the GAN term on, UNet checkpointing recomputed the discriminator-feature pass in
    backward with the adapters back on (CheckpointError); with it fixed, checkpointing the UNet and
    the VAE decoder changes no gradient."""
    plain = _lora_grad_after_step(tiny_config(tiny_dir, FULL), stage1_dir)
    ckpt = _lora_grad_after_step(tiny_config(tiny_dir, [*FULL, "model.gradient_checkpointing=true",
                                                        "model.vae_gradient_checkpointing=true"]), stage1_dir)
    assert plain.abs().sum() > 0 and torch.allclose(plain, ckpt, rtol=1e-4, atol=1e-7)


def test_bf16_frozen_base_keeps_fp32_adapters(tiny_dir, stage1_dir):
    """Under bf16 mixed precision the VAE and base UNet are held in bf16, every LoRA adapter
    (student, teacher, EMA target) in fp32; the student's gradient matches the fp32-base run's
    under the same autocast (its linear and conv layers read bf16 weights either way)."""
    bf16 = tiny_config(tiny_dir, [*FULL, "train.mixed_precision=\"bf16\""])
    models = build_stage2(bf16, init_from=os.path.join(stage1_dir, "student"))
    named = dict(models.student.unet.named_parameters())
    assert {p.dtype for n, p in named.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in named.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in models.student.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.teacher.parameters() + models.target.parameters()} == {torch.float32}

    # the gradient against an independent reference, the all-fp32 run without autocast (measured:
    # cos 0.988; the same autocast run with an fp32 base is 0.956 from it: bf16 rounding itself)
    held = _lora_grad_after_step(bf16, stage1_dir)
    fp32 = _lora_grad_after_step(tiny_config(tiny_dir, FULL), stage1_dir)
    cos = torch.nn.functional.cosine_similarity(held, fp32, dim=0)
    assert held.dtype == torch.float32 and cos > 0.97, float(cos)
    # an update far below bf16's resolution of the weight still lands in the fp32 adapter
    p = models.student.trainable_parameters()[0]
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(before.abs().max() * 1e-5)
    assert (p - before).abs().max() > 0


def test_table2_flow_sources_need_the_pixel_backbone(tiny_dir):
    """noise / noised_lr condition on the LR by channel concatenation: the SD backbone passed the LR
    latent as cross-attention states and crashed at the first step. Refused when configured."""
    for source in ("noise", "noised_lr"):
        with pytest.raises(ConfigError, match="needs model.backbone=pixel"):
            tiny_config(tiny_dir, [f"model.flow_source=\"{source}\""])
    pix = apply_overrides(tiny_config(tiny_dir), ["model.backbone=\"pixel\"", "model.flow_source=\"noise\""])
    assert pix.model.flow_source == "noise"


# ---- memory before launch ----------------------------------------------------------------------
def test_dry_run_prints_each_stages_memory_per_worker_and_warns(tiny_dir, capsys):
    from jobs.train import main

    args = ["--config", "tiny", *[f"--set={o}" for o in tiny_config_overrides(tiny_dir)], "--set=optim.batch_size=4",
            "--num-workers", "2", "--dry-run"]
    assert main([*args, "--gpu-memory", "80"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)["plan"]
    for stage in ("stage1", "stage2"):
        est = plan["memory"][stage]
        assert est["chunk_rows"] == 2 and est["total_gb"] == pytest.approx(sum(est["parts"].values()))
        assert est["parts"]["activations"] > 0 and est["parts"]["frozen_base"] > 0
    assert {"clip", "discriminator_heads"} <= set(plan["memory"]["stage2"]["parts"])
    assert "stage2:" in captured.err and "WARNING" not in captured.err
    assert main([*args, "--gpu-memory", "1e-6"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: stage1 needs" in err and "WARNING: stage2 needs" in err and "vae_gradient_checkpointing" in err


def test_memory_estimate_follows_rows_and_checkpointing(tiny_dir):
    """Saved activations scale with the rows of a chunk; VAE checkpointing removes the decoder's."""
    from flowsr.memory import estimate_training_memory

    cfg = tiny_config(tiny_dir, ["optim.batch_size=4"])
    one, two = (estimate_training_memory(cfg, 1, w)["parts"]["activations"] for w in (4, 2))
    assert two == pytest.approx(2 * one, rel=0.05)
    ckpt = tiny_config(tiny_dir, ["optim.batch_size=4", "model.vae_gradient_checkpointing=true"])
    assert estimate_training_memory(ckpt, 1, 2)["parts"]["activations"] < 0.8 * two


def tiny_config_overrides(tiny_dir):
    from flowsr.tiny import tiny_overrides

    return tiny_overrides(tiny_dir)


# ---- inference on the device -------------------------------------------------------------------
def test_flowsr_tiled_upscale_runs_on_the_models_device(tiny_dir):
    """Tiling, blending, the bicubic source and the colour fix create their tensors on the input's
    device: the whole tiled one-step path on `meta` (several tiles, VAE tiles, wavelet fix)."""
    from flowsr.backbones import build_backbone
    from flowsr.sample import upscale

    cfg = tiny_config(tiny_dir)
    backbone = build_backbone(cfg.model, device=META).eval().requires_grad_(False)
    lr = torch.zeros(1, 3, 24, 40, device=META)
    with torch.no_grad():
        out = upscale(backbone, lr, 4, tile=64, tile_overlap=16, vae_tile=64)
    assert out.device.type == "meta" and tuple(out.shape) == (1, 3, 96, 160)


def test_spandrel_upscaler_runs_on_its_device(tmp_path):
    """A weights file loaded onto the device (spandrel), tiles and the resize to the asked size on it."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    from pipeline.sr_models import WeightsUpscaler

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4, act_type="prelu")
    save_file(net.state_dict(), str(tmp_path / "compact_x4.safetensors"))
    up = WeightsUpscaler(str(tmp_path / "compact_x4.safetensors"), tile=16, tile_overlap=4, device=META)
    assert {p.device.type for p in up.model.model.parameters()} == {"meta"}
    out = up.upscale_tensor(torch.zeros(1, 3, 20, 36, device=META), out_size=(60, 108))
    assert out.device.type == "meta" and tuple(out.shape) == (1, 3, 60, 108)
