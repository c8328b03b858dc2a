"""Peak GPU memory of one training worker, estimated before launch without weights or a GPU.

The estimate builds every model of the stage with its real classes on the `meta` device (shapes
only: SD 2.1-base's when `model.pretrained` is not a local directory), runs one accumulation
chunk of the stage's own loss code on meta tensors, and counts the bytes autograd saves for the
backward pass. Then (docs/DESIGN.md, "Memory per worker"):

    peak = weights (frozen base, LoRA adapters, discriminator heads, CLIP, LPIPS)
         + trainable x (4 B gradient + 8 B AdamW moments)
         + activations saved for backward by one chunk of optim.batch_size / workers / grad_accum rows
         + transient: 2 x the largest saved tensor (the gradient buffers of the layer in flight)
         + 10% allocator slack

What it cannot see: the CUDA context (~0.5 GB, outside PyTorch's allocator) and autocast's
own casts (under bf16 the frozen base is held in bf16, so activations are counted in bf16;
the LoRA paths in fp32). Attention is counted as a fused kernel saves it (q, k, v, output, log-sum-
exp), not as the (L x L) matrix of the reference implementation. `benchmarks/gpu_suite.py` puts
the estimate beside the measured peak when a GPU is at hand.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict

import torch
import torch.nn.functional as F

from .config import FlowSRConfig

GB = 2 ** 30
SLACK = 0.10  # the caching allocator's fragmentation, on top of what tensors hold
META = torch.device("meta")


def estimate_training_memory(cfg: FlowSRConfig, stage: int, num_workers: int) -> Dict:
    """{"total_gb", "parts": {name: GB}, "chunk_rows"} of one worker training `stage` of `cfg`
    with the global batch split over `num_workers` workers."""
    rows = cfg.optim.batch_size // (num_workers * cfg.optim.grad_accum)
    if rows < 1:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} gives no row per worker and chunk at "
                         f"{num_workers} workers x grad_accum {cfg.optim.grad_accum}")
    with _quiet():
        return _estimate(cfg, stage, rows)


@contextlib.contextmanager
def _quiet():
    """Random-init and dtype notices of the libraries building shapes-only models are noise here."""
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _estimate(cfg: FlowSRConfig, stage: int, rows: int) -> Dict:
    models = _meta_models(cfg, stage)
    parts = _weights(models)
    trainable = sum(p.numel() for p in models.student.trainable_parameters())
    if models.disc is not None:
        trainable += sum(p.numel() for p in models.disc.parameters())
    parts["gradients"] = 4 * trainable
    parts["optimizer_states"] = 8 * trainable
    saved, largest = _saved_activations(cfg, stage, models, rows)
    parts["activations"] = saved
    parts["transient"] = 2 * largest
    parts["allocator_slack"] = int(SLACK * sum(parts.values()))
    return {"total_gb": sum(parts.values()) / GB, "parts": {k: v / GB for k, v in parts.items()},
            "chunk_rows": rows}


def memory_report(memory: Dict, cfg: FlowSRConfig, gpu_memory: float) -> str:
    """The per-stage, per-worker memory estimates as a table, with a warning for each stage
    above `gpu_memory` GB and what lowers it."""
    lines = [f"estimated peak GPU memory per worker ({cfg.train.num_workers} workers, global batch "
             f"{cfg.optim.batch_size}, {cfg.data.patch_size}^2 patches, {cfg.train.mixed_precision}; "
             f"docs/DESIGN.md \"Memory per worker\"):"]
    for stage, est in memory.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in est["parts"].items())
        lines.append(f"  {stage}: {est['total_gb']:.1f} GB ({est['chunk_rows']} rows per chunk) = {parts}")
    for stage, est in memory.items():
        if est["total_gb"] > gpu_memory:
            fixes = [f for f, on in (("--set model.vae_gradient_checkpointing=true",
                                      not cfg.model.vae_gradient_checkpointing),
                                     ("--set model.gradient_checkpointing=true", not cfg.model.gradient_checkpointing),
                                     ("more --num-workers", True), ("a larger --set optim.grad_accum=N", True)) if on]
            lines.append(f"WARNING: {stage} needs about {est['total_gb']:.0f} GB per worker, more than the "
                         f"{gpu_memory:g} GB of --gpu-memory: it will run out of memory. Lower it with "
                         f"{', '.join(fixes)}.")
    return "\n".join(lines)


# ---- models of the stage, shapes only ----------------------------------------------------------
def _meta_models(cfg: FlowSRConfig, stage: int):
    from .build import _frozen_in_bf16
    from .discriminator import DiscriminatorHeads
    from .losses import ImageDistance
    from .train_step import Models

    with torch.device(META):
        student = _meta_backbone(cfg)
        teacher = target = disc = iqa = None
        if stage == 2:
            teacher, target = student.frozen_copy("teacher"), student.frozen_copy("target")
            if cfg.loss.lambda_adv > 0:
                disc = DiscriminatorHeads(student.feature_channels(), cfg.loss.disc_head_channels)
            if cfg.loss.lambda_iqa > 0:
                iqa = _meta_clip(cfg)
        _frozen_in_bf16(cfg, student)
        lpips = _meta_lpips(cfg) if cfg.loss.lambda_lpips > 0 else None
    return Models(student=student, distance=ImageDistance(lpips, cfg.loss.lambda_lpips), teacher=teacher,
                  target=target, disc=disc, iqa=iqa)


def _meta_backbone(cfg: FlowSRConfig):
    from .backbones import PixelBackbone

    if cfg.model.backbone == "pixel":
        return PixelBackbone.from_config(cfg.model)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from .backbones.sd import STUDENT, SDLatentBackbone, lora_config
    from .tiny import SD21_BASE_UNET, SD21_BASE_VAE

    source = cfg.model.pretrained
    unet_cfg, vae_cfg = dict(SD21_BASE_UNET), dict(SD21_BASE_VAE)
    if source and os.path.isdir(os.path.join(source, "unet")):  # a local model: its own shapes
        unet_cfg = dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
        vae_cfg = dict(AutoencoderKL.load_config(source, subfolder="vae"))
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    empty = torch.zeros(1, 77, unet.config.cross_attention_dim)
    backbone = SDLatentBackbone(vae, unet, DDPMScheduler(num_train_timesteps=1000), empty, cfg.model)
    if cfg.model.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
    if cfg.model.vae_gradient_checkpointing:
        backbone.vae.enable_gradient_checkpointing()
    backbone.unet.add_adapter(lora_config(cfg.model), adapter_name=STUDENT)
    backbone.unet.set_adapter(STUDENT)
    backbone._freeze_all_but(STUDENT)
    return backbone


def _meta_clip(cfg: FlowSRConfig):
    import open_clip

    from .perceptual import ClipIQA

    arch = cfg.loss.clip_arch
    if arch.startswith("local-dir:"):  # a model of its own: built from its directory, then shapes only
        with torch.device("cpu"):
            return ClipIQA.from_pretrained(arch, "", device=META)
    model = open_clip.create_model(arch, pretrained=None, device=META)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipIQA(model, open_clip.get_tokenizer(arch), int(size), (0.5,) * 3, (0.5,) * 3).to(META)


def _meta_lpips(cfg: FlowSRConfig):
    import lpips

    model = lpips.LPIPS(net=cfg.loss.lpips_net, pretrained=False, pnet_rand=True, verbose=False)
    return model.to(META).requires_grad_(False)  # (its scaling buffers are built on the CPU)


def _weights(models) -> Dict[str, int]:
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)

    student = models.student
    named = dict(student.named_parameters())
    parts = {"frozen_base": size(p for n, p in named.items() if "lora_" not in n),
             "lora_adapters": size(p for n, p in named.items() if "lora_" in n)}
    if models.teacher is not None and not hasattr(student, "unet"):  # pixel: teacher and target are copies
        parts["frozen_base"] += size(models.teacher.parameters()) + size(models.target.parameters())
    if models.disc is not None:
        parts["discriminator_heads"] = size(models.disc.parameters())
    if models.iqa is not None:
        parts["clip"] = size(models.iqa.parameters())
    if models.distance.lpips is not None:
        parts["lpips"] = size(models.distance.lpips.parameters())
    return parts


# ---- activations -------------------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward (q, k, v, output, fp32 log-sum-exp), on meta."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the estimate runs the forward only
        raise NotImplementedError


def _fused_sdpa(q, k, v, *args, **kwargs):
    return _FusedAttention.apply(q, k, v)


@contextlib.contextmanager
def _count_saved(exclude):
    """Sum the bytes of the distinct storages autograd saves for backward (views and expanded
    tensors count their storage once; parameters not at all); yields the tally."""
    tally = {"bytes": 0, "largest": 0, "seen": set(), "keep": []}
    params = {t.untyped_storage()._cdata for t in exclude}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in tally["seen"]:
            n = storage.nbytes()
            tally["bytes"] += n
            tally["largest"] = max(tally["largest"], n)
            tally["seen"].add(key)
            tally["keep"].append(storage)  # keys stay unique while the trace lives
        return t

    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield tally
    finally:
        F.scaled_dot_product_attention = sdpa


def _saved_activations(cfg: FlowSRConfig, stage: int, models, rows: int):
    from .draws import StepDraws
    from .schedules import make_pair_sampler
    from .train_step import stage1_losses, stage2_losses

    p = cfg.data.patch_size
    batch = {"hr": torch.zeros(rows, 3, p, p, device=META), "lr": torch.zeros(rows, 3, p, p, device=META),
             "hr_caption": ["a sharp photo"] * rows, "lr_caption": ["a blurry photo"] * rows}
    draws = StepDraws(0, stage, 0, rows, META)
    params = [t for m in _modules(models) for t in m.parameters()]
    with _count_saved(params) as tally:
        if stage == 1:
            stage1_losses(batch, models, cfg, draws)
        else:
            s = cfg.schedule
            sampler = make_pair_sampler(s.sampler, n_fast=s.n_fast, n_slow=s.n_slow, n_intervals=s.n_intervals)
            stage2_losses(batch, models, cfg, sampler, draws)
    return tally["bytes"], tally["largest"]


def _modules(models):
    out = [models.student]
    for m in (models.disc, models.iqa, models.distance.lpips, getattr(models.teacher, "net", None),
              getattr(models.target, "net", None)):
        if m is not None:
            out.append(m)
    return out
