"""A small pixel-space UNet (diffusers `UNet2DModel`) trained from scratch.

For the embedded demo, the ablations and fast experiments. encode / decode are the identity.
With `flow_source` other than `sr_flow` (Table-2 ablation) the LR image is concatenated to
x_t as a condition, so the network has 6 input channels.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..config import ModelConfig
from .common import unet_encoder_features

WEIGHT_NAME = "pixel_unet.safetensors"


def build_unet(cfg: ModelConfig):
    from diffusers import UNet2DModel

    n = len(cfg.pixel_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.pixel_attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    in_channels = 3 if cfg.flow_source == "sr_flow" else 6
    return UNet2DModel(in_channels=in_channels, out_channels=3, block_out_channels=tuple(cfg.pixel_channels),
                       layers_per_block=cfg.pixel_layers_per_block, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=min(8, min(cfg.pixel_channels)),
                       add_attention=cfg.pixel_attention)


class PixelView:
    """A frozen copy of the pixel network (teacher, EMA target) behind the velocity contract."""

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        self.net, self.cfg = net, cfg

    def velocity(self, x_t, t, cond=None):
        return _velocity(self.net, self.cfg, x_t, t, cond)

    def parameters(self):
        return list(self.net.parameters())

    def save(self, directory: str) -> None:
        save_net(self.net, directory)

    def load(self, directory: str) -> None:
        load_net(self.net, directory)


def save_net(net: nn.Module, directory: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, os.path.join(directory, WEIGHT_NAME))


def load_net(net: nn.Module, directory: str) -> None:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pixel UNet weights at {path}")
    net.load_state_dict(load_file(path, device=str(next(net.parameters()).device)))


def _velocity(net, cfg: ModelConfig, x_t, t, cond):
    x = x_t if cfg.flow_source == "sr_flow" else torch.cat([x_t, cond], dim=1)
    dtype = next(net.parameters()).dtype  # the flow math hands over fp32; timesteps stay fp32
    return net(x.to(dtype), t.float() * cfg.timestep_scale).sample


class PixelBackbone(nn.Module):
    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = net
        self.student_forward = None  # a DDP wrapper of `net`, set by the trainer
        self._feature_net = None
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, device=None) -> "PixelBackbone":
        backbone = cls(build_unet(cfg), cfg)
        return backbone.to(device) if device is not None else backbone

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        net = self.net if self.student_forward is None else self.student_forward
        return _velocity(net, self.cfg, x_t, t, cond)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    latent_factor = 1

    def trainable_parameters(self):
        return list(self.net.parameters())

    def frozen_copy(self, name: str) -> PixelView:
        view = PixelView(copy.deepcopy(self.net).requires_grad_(False).eval(), self.cfg)
        if self._feature_net is None and name == "teacher":
            # the teacher is the stage-1 model: share it as the discriminator's frozen features,
            # so a stage-2 run resumed from a checkpoint sees the same features as a fresh one
            self._feature_net = view.net
        return view

    def discriminator_features(self, x_noisy: torch.Tensor, timesteps: torch.Tensor):
        """Down/mid features of a frozen snapshot of the network — the teacher's (the stage-1
        model) once `frozen_copy("teacher")` ran, else taken at the first call — the pixel
        analogue of the frozen SD UNet."""
        if self._feature_net is None:
            self._feature_net = copy.deepcopy(self.net).requires_grad_(False).eval()
        x = x_noisy if self.cfg.flow_source == "sr_flow" else torch.cat([x_noisy, x_noisy], dim=1)
        return unet_encoder_features(self._feature_net, x, timesteps)

    def feature_channels(self):
        ch = list(self.cfg.pixel_channels)
        return ch + [ch[-1]]

    def save_trainable(self, directory: str) -> None:
        save_net(self.net, directory)

    def load_trainable(self, directory: str) -> None:
        load_net(self.net, directory)
