"""Backbones, losses, train steps, checkpoints and configs of the method core (tiny models)."""
import json
from dataclasses import replace

import pytest
import torch

from flowsr import flow
from flowsr.backbones import PixelBackbone, SDLatentBackbone
from flowsr.build import build_stage1, build_stage2, make_optimizer
from flowsr.checkpoint import load_for_inference, save_checkpoint
from flowsr.config import FlowSRConfig, apply_overrides, preset, resolve
from flowsr.losses import ImageDistance, discriminator_hinge_loss, quality_alignment_loss
from flowsr.perceptual import ClipIQA
from flowsr.sample import super_resolve
from flowsr.schedules import make_pair_sampler
from flowsr.tiny import tiny_config
from flowsr.train_step import Models, stage1_step, stage2_losses, stage2_step, total_loss
from flowsr.weights import MissingWeightsError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return tiny_config(tiny_dir)


def make_batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    lr = torch.nn.functional.interpolate(lr, size=(size, size), mode="bicubic", align_corners=False)
    return {"hr": hr, "lr": lr, "hr_caption": ["sharp clean photo"] * n, "lr_caption": ["blurry noisy photo"] * n}


# ---- exact-flow identities through the training code -----------------------------------------
class ExactFlow:
    """Identity codec and the exact velocity of the batch's straight path."""

    cfg = preset("pixel-small").model
    noise_scheduler = None
    student_forward = None

    def __init__(self, batch):
        self.v = flow.target_velocity(batch["hr"], batch["lr"])

    def encode(self, x):
        return x

    def decode(self, z):
        return z

    def velocity(self, x, t, cond=None):
        n = x.shape[0]
        return self.v if n == len(self.v) else self.v.repeat(n // len(self.v) + 1, 1, 1, 1)[:n]

    def text_condition(self, captions):
        return None


def test_hr_regularised_consistency_is_zero_for_exact_flow():
    batch = make_batch(4)
    exact = ExactFlow(batch)
    # teacher = student = target = the exact velocity; no flow part, so every sample is consistency
    cfg = apply_overrides(preset("pixel-small"), ["schedule.flow_fraction=0.0"])
    # with flow_fraction 0 the student sees [x_t', x_hat_t]: give it velocities of matching size
    exact.v = torch.cat([exact.v, exact.v])
    teacher = ExactFlow(batch)
    models = Models(student=exact, distance=ImageDistance(None, 0.0), teacher=teacher, target=teacher)
    for name in ("fast_slow", "n_interval", "slow_only"):
        losses, _, _ = stage2_losses(batch, models, cfg, make_pair_sampler(name), torch.Generator().manual_seed(0))
        assert losses["cons"].abs().max() < 1e-10, name


def test_loss_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert torch.allclose(discriminator_hinge_loss(real, fake), torch.tensor([0.0, 1.5, 4.0]))
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + 1))
    assert torch.allclose(quality_alignment_loss(img, pos, neg), expected)
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert torch.allclose(ImageDistance(None, 0.0)(a, b), torch.ones(2))
    with pytest.raises(ValueError):
        ImageDistance(None, 2.0)


# ---- SD backbone: loading, LoRA, round trips -------------------------------------------------
def test_sd_lora_roundtrip_and_stock_diffusers_load(cfg, tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    bb = SDLatentBackbone.from_pretrained(cfg.model)
    for p in bb.trainable_parameters():  # make the LoRA non-trivial (B starts at zero)
        p.data.normal_(0, 0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ref = bb.velocity(x, t)
        with bb.adapters_disabled():
                base = bb.unet(x, t * 999, encoder_hidden_states=bb.empty_embedding.expand(2, -1, -1)).sample
    bb.save_trainable(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()

    again = SDLatentBackbone.from_pretrained(cfg.model)
    again.load_trainable(str(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.equal(again.velocity(x, t), ref)
        assert not torch.allclose(ref, base)
    # a stock diffusers UNet loads the same file through diffusers' own LoRA loader
    unet = UNet2DConditionModel.from_pretrained(cfg.model.pretrained, subfolder="unet")
    unet.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", adapter_name="flowsr",
                           weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        stock = unet(x, t * 999, encoder_hidden_states=bb.empty_embedding.expand(2, -1, -1)).sample
    assert torch.allclose(stock, ref, atol=1e-6)


def test_encode_decode_shapes(cfg):
    bb = SDLatentBackbone.from_pretrained(cfg.model)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    z = bb.encode(img)
    assert z.shape == (2, 4, 8, 8)
    assert bb.decode(z).shape == img.shape
    out = super_resolve(bb, img, steps=2)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1


def test_missing_weights_raise_one_clear_error(tmp_path):
    model = replace(preset("paper").model, pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="model.pretrained"):
        SDLatentBackbone.from_pretrained(model)
    with pytest.raises(MissingWeightsError, match="model.pretrained"):
        SDLatentBackbone.from_pretrained(replace(model, pretrained=""))
    with pytest.raises(MissingWeightsError, match="clip_pretrained"):
        ClipIQA.from_pretrained("ViT-L-14", "")


# ---- steps -------------------------------------------------------------------------------------
def _grads(params):
    return [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]


def test_only_lora_and_heads_get_gradients(cfg, tiny_dir, tmp_path):
    s1 = build_stage1(cfg)
    s1.student.save_trainable(str(tmp_path / "s1"))
    models = build_stage2(cfg, init_from=str(tmp_path / "s1"))
    opt_g = make_optimizer(models.student.trainable_parameters(), 1e-3, cfg)
    losses, z_fake, z_real = stage2_losses(make_batch(), models, cfg, make_pair_sampler("fast_slow"),
                                           torch.Generator().manual_seed(0))
    assert set(losses) == {"flow", "cons", "adv", "iqa"}
    total_loss(losses, cfg).backward()
    lora = {id(p) for p in models.student.trainable_parameters()}
    named = dict(models.student.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad and all(id(named[n]) in lora for n in with_grad)
    assert all(".student." in n for n in with_grad)
    assert not any(p.grad is not None for p in models.teacher.parameters() + models.target.parameters())
    assert not any(p.grad is not None for p in models.disc.parameters())  # G step leaves D alone
    assert not any(p.grad is not None for p in models.iqa.parameters())
    assert not any(p.grad is not None for p in models.distance.lpips.parameters())
    opt_g.zero_grad()
    from flowsr.train_step import discriminator_losses

    discriminator_losses(z_real, z_fake, models, cfg).mean().backward()
    assert _grads(models.disc.parameters())
    assert not any(p.grad is not None for p in models.student.parameters())


def test_stage2_steps_lower_the_loss_and_update_ema(cfg, tmp_path):
    torch.manual_seed(0)
    s1 = build_stage1(cfg)
    s1.student.save_trainable(str(tmp_path / "s1"))
    models = build_stage2(cfg, init_from=str(tmp_path / "s1"))
    opt_g = make_optimizer(models.student.trainable_parameters(), 3e-3, cfg)
    opt_d = make_optimizer(models.disc.parameters(), 1e-3, cfg)
    sampler = make_pair_sampler("fast_slow")
    batch = make_batch(4)
    teacher_before = [p.clone() for p in models.teacher.parameters()]
    target_before = [p.clone() for p in models.target.parameters()]
    history = [stage2_step(batch, models, (opt_g, opt_d), cfg, sampler, torch.Generator().manual_seed(7))["loss"]
               for _ in range(20)]
    assert history[-1] < history[0], history
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, models.teacher.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(target_before, models.target.parameters()))


def test_losses_finite_under_bf16_autocast(cfg, tmp_path):
    bf16 = apply_overrides(cfg, ["train.mixed_precision=\"bf16\"", "optim.grad_accum=2"])
    s1 = build_stage1(bf16)
    opt = make_optimizer(s1.student.trainable_parameters(), 1e-3, bf16)
    m1 = stage1_step(make_batch(4), s1, opt, bf16, torch.Generator().manual_seed(0))
    s1.student.save_trainable(str(tmp_path / "s1"))
    models = build_stage2(bf16, init_from=str(tmp_path / "s1"))
    opts = (make_optimizer(models.student.trainable_parameters(), 1e-3, bf16),
            make_optimizer(models.disc.parameters(), 1e-3, bf16))
    m2 = stage2_step(make_batch(4), models, opts, bf16, make_pair_sampler("fast_slow"), torch.Generator().manual_seed(0))
    values = list(m1.values()) + list(m2.values())
    assert {"flow", "cons", "adv", "iqa", "disc"} <= set(m2)
    assert all(torch.isfinite(torch.tensor(v)) for v in values)


def test_pixel_backbone_checkpoint_roundtrip(tmp_path):
    cfg = preset("pixel-small")
    models = build_stage2(cfg)
    for p in models.student.trainable_parameters():
        p.data.add_(0.01)
    opt = make_optimizer(models.student.trainable_parameters(), 1e-3, cfg)
    save_checkpoint(str(tmp_path / "ck"), cfg=cfg, stage=2, step=5, models=models, optimizers=[opt, None])
    loaded, loaded_cfg = load_for_inference(str(tmp_path / "ck"))
    assert loaded_cfg == cfg
    x, t = torch.rand(1, 3, 32, 32), torch.tensor([1.0])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, t), models.student.velocity(x, t))
    ema, _ = load_for_inference(str(tmp_path / "ck"), weights="target")
    with torch.no_grad():
        assert torch.equal(ema.velocity(x, t), models.target.velocity(x, t))


@pytest.mark.parametrize("source", ["noise", "noised_lr"])
def test_table2_flow_variants_condition_on_lr(source):
    cfg = apply_overrides(preset("pixel-small"), [f"model.flow_source=\"{source}\""])
    bb = PixelBackbone.from_config(cfg.model)
    assert bb.net.config.in_channels == 6
    models = Models(student=bb, distance=ImageDistance(None, 0.0))
    opt = make_optimizer(bb.trainable_parameters(), 1e-3, cfg)
    assert torch.isfinite(torch.tensor(stage1_step(make_batch(2, 32), models, opt, cfg)["loss"]))
    assert super_resolve(bb, make_batch(1, 32)["lr"], steps=2, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


# ---- config -------------------------------------------------------------------------------------
def test_config_roundtrip_overrides_and_validation(tmp_path):
    cfg = preset("paper")
    assert (cfg.model.lora_rank, cfg.optim.lr, cfg.optim.batch_size, cfg.schedule.n_fast) == (32, 2e-5, 16, 4)
    assert (cfg.loss.lambda_cd, cfg.loss.lambda_adv, cfg.loss.lambda_iqa, cfg.loss.lambda_lpips) == (0.1, 0.05, 0.1, 2.0)
    assert FlowSRConfig.from_dict(json.loads(cfg.to_json())) == cfg
    cfg.save(tmp_path / "c.json")
    assert resolve(str(tmp_path / "c.json"), ["schedule.n_fast=8"]).schedule.n_fast == 8
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, ["schedule.nfast=8"])
    with pytest.raises(ValueError, match="unknown schedule.sampler"):
        apply_overrides(cfg, ["schedule.sampler=\"cosine\""])
    with pytest.raises(ValueError, match="n_fast"):
        apply_overrides(cfg, ["schedule.n_fast=0"])
    with pytest.raises(ValueError, match="divide evenly"):
        apply_overrides(cfg, ["train.num_workers=3"])
    # the paper's schedule: constant lr, t uniform, one lr for both stages; other values are rejected
    from flowsr.trainer import stage_lr

    assert (cfg.optim.lr_schedule, cfg.schedule.flow_t1_share) == ("constant", 0.0)
    assert stage_lr(cfg, 1) == stage_lr(cfg, 2) == 2e-5
    small = preset("pixel-small")
    assert (stage_lr(small, 1), stage_lr(small, 2)) == (1e-3, 1e-4)
    with pytest.raises(ValueError, match="flow_t1_share"):
        apply_overrides(cfg, ["schedule.flow_t1_share=1.5"])
    with pytest.raises(ValueError, match="unknown optim.lr_schedule"):
        apply_overrides(cfg, ["optim.lr_schedule=linear"])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
