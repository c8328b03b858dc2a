"""Stable Diffusion latent backbone: frozen VAE + UNet, LoRA adapters through peft.

One frozen base UNet carries several named LoRA adapters — the trainable `student`, and frozen
copies for the stage-2 `teacher` and EMA `target` — switched per forward. The discriminator's
features come from the same base with adapters disabled. Only the student's LoRA is trainable,
so DDP sees a fixed set of parameters.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..config import ModelConfig
from ..weights import DEFAULT_SD, MissingWeightsError, hub_hint, looks_like_hub_id, missing, pass_as
from .common import unet_encoder_features

STUDENT = "student"
TRAIN_OPTION = "--set model.pretrained="  # how `flowsr train` sets the base model (weight hints)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_config(cfg: ModelConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                      target_modules=list(cfg.lora_targets))


def timestep(t: torch.Tensor, scale: float) -> torch.Tensor:
    """The network's timestep `t * scale`, in fp32 whatever dtype `t` or the network has: bf16 keeps
    8 significant bits, so only ~half of the 1000 slow-grid times would stay distinct and t = 1
    would reach the UNet as 1000 instead of 999. diffusers' sinusoidal embedding takes fp32."""
    return t.float() * scale


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts) -> torch.Tensor:
    """CLIP text hidden states (B, 77, D) as SD conditions on them."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class AdapterView:
    """A velocity model that runs the shared UNet with one named adapter (teacher / target)."""

    def __init__(self, backbone: "SDLatentBackbone", adapter: str):
        self.backbone, self.adapter = backbone, adapter

    def velocity(self, x_t, t, cond=None):
        with self.backbone.using_adapter(self.adapter):
            return self.backbone.velocity(x_t, t, cond)

    def parameters(self):
        return self.backbone.adapter_parameters(self.adapter)

    def save(self, directory: str) -> None:
        self.backbone.save_trainable(directory, adapter=self.adapter)

    def load(self, directory: str) -> None:
        self.backbone.load_trainable(directory, adapter=self.adapter)


class SDLatentBackbone(nn.Module):
    """SD 2.1-base as an SR-flow velocity model in VAE latent space (docs/DESIGN.md, "Latent space")."""

    def __init__(self, vae, unet, noise_scheduler, empty_embedding, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = vae.requires_grad_(False).eval()
        self.unet = unet.requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        self.register_buffer("empty_embedding", empty_embedding, persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.student_forward = None  # a DDP wrapper of `unet`, set by the trainer

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, *, device=None, with_lora: bool = True,
                        option: str = TRAIN_OPTION) -> "SDLatentBackbone":
        """The SD components of `cfg.pretrained` (hub id or diffusers directory); `option` is how
        the calling command sets that location, named in the error when it cannot be loaded."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source = cfg.pretrained
        hint = hub_hint(source if source and looks_like_hub_id(source) else DEFAULT_SD, option)
        if not source:
            raise MissingWeightsError(f"the SD base model location is empty (`{pass_as(option, '')}`): the SD "
                                      f"backbone needs a diffusers Stable Diffusion directory or hub id. {hint}")
        kw = {"local_files_only": True} if os.path.isdir(source) else {}
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
        except (OSError, ValueError, EnvironmentError) as err:
            raise missing("Stable Diffusion (vae, unet, tokenizer, text_encoder, scheduler)", source, hint, err) from err
        empty = encode_prompts(tokenizer, text_encoder.eval(), [""])
        backbone = cls(vae, unet, scheduler, empty, cfg)
        if cfg.gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        if cfg.vae_gradient_checkpointing:
            backbone.vae.enable_gradient_checkpointing()
        if with_lora:
            backbone.unet.add_adapter(lora_config(cfg), adapter_name=STUDENT)
            backbone.unet.set_adapter(STUDENT)
            backbone._freeze_all_but(STUDENT)
        return backbone.to(device) if device is not None else backbone

    def hold_frozen_in(self, dtype: torch.dtype) -> "SDLatentBackbone":
        """Keep the frozen weights (VAE, base UNet) in `dtype` and every LoRA adapter in fp32.

        Under bf16 autocast the convolutions and linear layers read bf16 copies of their weights
        anyway: holding the frozen base in bf16 saves that per-pass cast and its fp32 original
        (~1.7 GB for SD 2.1's UNet), while the adapters the optimiser updates stay fp32."""
        self.vae.to(dtype)
        self.unet.to(dtype)
        for name, p in self.unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        return self

    # ---- the velocity contract --------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """v(x_t, t) with the active adapter; `cond` = text hidden states or None (empty prompt)."""
        ehs = cond if cond is not None else self.empty_embedding.expand(x_t.shape[0], -1, -1)
        timesteps = timestep(t, self.cfg.timestep_scale)
        dtype = self.unet.dtype  # conv_in's: the flow math hands over fp32, a bf16 UNet gets bf16 inputs
        forward = self.student_forward if (self.student_forward is not None and self._active() == STUDENT) else self.unet
        return forward(x_t.to(dtype), timesteps, encoder_hidden_states=ehs.to(dtype)).sample

    # ---- image <-> latent ----------------------------------------------------------------------
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), fp32; the posterior mode."""
        return self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode().float() * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (not clamped: losses see the raw output)."""
        return self.vae.decode(z.to(self.vae.dtype) / self.scaling_factor).sample

    # ---- adapters: student, teacher, target ----------------------------------------------
    def _active(self) -> str:
        return self.unet.active_adapters()[0] if self.unet._hf_peft_config_loaded else ""

    def _freeze_all_but(self, name: str) -> None:
        for pname, p in self.unet.named_parameters():
            p.requires_grad_(f".{name}." in pname)

    @contextlib.contextmanager
    def using_adapter(self, name: str):
        """Run the UNet with adapter `name`; restores the student and every requires_grad flag."""
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        self.unet.set_adapter(name)
        try:
            yield
        finally:
            self.unet.set_adapter(STUDENT)
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def adapters_disabled(self):
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)

    def adapter_parameters(self, name: str):
        """The LoRA parameters of adapter `name`, in module order (matching across adapters)."""
        return [p for n, p in self.unet.named_parameters() if f".{name}." in n]

    def trainable_parameters(self):
        return self.adapter_parameters(STUDENT)

    def frozen_copy(self, name: str) -> AdapterView:
        """A frozen adapter `name` initialised from the student (teacher, EMA target), on the
        student's device (copied parameter by parameter, so any device works, `meta` included)."""
        if name in getattr(self.unet, "peft_config", {}):
            raise ValueError(f"adapter {name!r} exists already")
        self.unet.add_adapter(lora_config(self.cfg), adapter_name=name)
        self.unet.set_adapter(STUDENT)
        self._freeze_all_but(STUDENT)
        device = self.trainable_parameters()[0].device
        for module in self.unet.modules():  # peft leaves a new adapter where it cannot place it (meta)
            for layers in (getattr(module, "lora_A", None), getattr(module, "lora_B", None)):
                if isinstance(layers, nn.ModuleDict) and name in layers:
                    layers[name].to(device)
        copies, sources = self.adapter_parameters(name), self.trainable_parameters()
        if [p.shape for p in copies] != [p.shape for p in sources]:
            raise ValueError(f"adapter {name!r} does not mirror the student's LoRA layers")
        for dst, src in zip(copies, sources):
            dst.data = src.detach().clone()
        return AdapterView(self, name)

    # ---- discriminator features ----------------------------------------------------------
    def discriminator_features(self, z_noisy: torch.Tensor, timesteps: torch.Tensor):
        """Down- and mid-block features of the frozen base UNet (adapters off).

        Never through gradient checkpointing: a checkpointed block recomputes its forward during
        backward, when the adapters are on again, and would differ from the forward it replaces
        (torch raises CheckpointError). The feature pass is the encoder half only."""
        dtype = self.unet.dtype
        ehs = self.empty_embedding.expand(z_noisy.shape[0], -1, -1).to(dtype)
        with self.adapters_disabled(), self._checkpointing_off():
            return unet_encoder_features(self.unet, z_noisy.to(dtype), timesteps, ehs)

    @contextlib.contextmanager
    def _checkpointing_off(self):
        was = self.unet.is_gradient_checkpointing
        if was:
            self.unet.disable_gradient_checkpointing()
        try:
            yield
        finally:
            if was:
                self.unet.enable_gradient_checkpointing()

    def feature_channels(self):
        ch = list(self.unet.config.block_out_channels)
        return ch + [ch[-1]]

    # ---- checkpoints: LoRA in peft / diffusers format --------------------------------------
    def save_trainable(self, directory: str, adapter: str = STUDENT) -> None:
        """Write `pytorch_lora_weights.safetensors` in the layout of diffusers' SD LoRA loader
        (`unet.`-prefixed keys, the LoRA config as metadata): a stock `StableDiffusionPipeline`'s
        `load_lora_weights(directory)` loads it."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=adapter)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            directory, unet_lora_layers={k: v.detach().contiguous() for k, v in state.items()},
            weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=self.unet.peft_config[adapter].to_dict())

    def load_trainable(self, directory: str, adapter: str = STUDENT) -> None:
        """Load LoRA weights saved by `save_trainable` into adapter `adapter` (also those of older
        checkpoints, saved without the `unet.` prefix)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = os.path.join(directory, LORA_WEIGHT_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no LoRA weights at {path}")
        state = {k.removeprefix("unet."): v for k, v in load_file(path).items()
                 if not k.startswith("text_encoder.")}
        result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter)
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if bad:
            raise ValueError(f"LoRA weights in {path} do not fit this UNet: {bad[:3]} ...")
        self._freeze_all_but(STUDENT)
