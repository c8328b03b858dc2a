"""Frozen perceptual networks: LPIPS (Eq. 7 distance) and CLIP (Eq. 9), loaded from their real
sources. A missing weight raises `MissingWeightsError`; random backbones only when asked for."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .weights import MissingWeightsError, missing


def load_lpips(net: str = "vgg", pretrained_backbone: bool = True) -> nn.Module:
    """lpips.LPIPS with its shipped linear heads; the AlexNet/VGG backbone comes from torchvision's
    ImageNet weights (torch hub cache). `pretrained_backbone=False` is for tests only."""
    import lpips

    try:
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    except Exception as err:  # torchvision raises URLError / RuntimeError / OSError when offline
        hint = (f"LPIPS needs torchvision's ImageNet {net} weights in {torch.hub.get_dir()}/checkpoints "
                f"(copy them there from a machine with internet), or set loss.lambda_lpips=0.")
        raise missing(f"the LPIPS {net} backbone", f"torchvision://{net}", hint, err) from err
    return model.eval().requires_grad_(False)


class ClipIQA(nn.Module):
    """CLIP image and text towers (open_clip) for the image-quality alignment loss."""

    def __init__(self, model, tokenizer, image_size: int, mean, std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, arch: str, pretrained: str = "", device=None,
                        quick_gelu: Optional[bool] = None) -> "ClipIQA":
        """open_clip `arch` with weights `pretrained` (a tag such as `openai`, or a checkpoint file);
        `arch = local-dir:/path` loads config and weights from that directory. `quick_gelu`: see
        `uses_quick_gelu`. The whole module (towers, normalisation buffers) goes to `device`."""
        import open_clip

        hint = ("Pass loss.clip_pretrained=/path/to/open_clip_pytorch_model.bin (or loss.clip_arch="
                "local-dir:/path/to/open_clip_dir) with weights downloaded on a machine with hub access.")
        local_dir = arch.startswith("local-dir:")
        if not local_dir and not pretrained:
            raise MissingWeightsError(f"loss.clip_pretrained is empty for CLIP {arch!r}: refusing random weights. {hint}")
        force = uses_quick_gelu(arch, pretrained, quick_gelu)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None if local_dir else pretrained, device="cpu", force_quick_gelu=force)
        except Exception as err:  # open_clip raises RuntimeError / OSError / HF hub errors offline
            raise missing(f"CLIP {arch}", pretrained or arch, hint, err) from err
        tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))
        iqa = cls(model, tokenizer, int(size), norm.mean, norm.std)
        return iqa.to(device) if device is not None else iqa

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP's normalised input at its image size; differentiable.
        Antialiased bicubic, as open_clip's own (PIL) preprocessing: without it a 512 -> 224 resize
        aliases the very textures Eq. 9 judges."""
        x = F.interpolate((image.float() + 1) / 2, size=(self.image_size, self.image_size),
                          mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> L2-normalised features (B, D); differentiable."""
        return F.normalize(self.model.encode_image(self.preprocess(image)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.mean.device, non_blocking=True)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def uses_quick_gelu(arch: str, pretrained: str, quick_gelu: Optional[bool] = None) -> bool:
    """Whether to build `arch` with QuickGELU for the weights `pretrained` (`force_quick_gelu`).

    OpenAI's CLIP weights were trained with QuickGELU, but open_clip builds `ViT-L-14` with plain
    GELU unless asked (a warning for the `openai` tag, nothing for a file): the features are then
    quietly wrong. `quick_gelu` true / false decides; None (auto) follows open_clip's table of
    pretrained tags (`openai` -> QuickGELU), and for a checkpoint file recognises OpenAI's weights
    by ".openai" in the path (the hub repo of open_clip's `openai` tag is named
    `timm/vit_large_patch14_clip_224.openai`) or by OpenAI's TorchScript release format.
    Another file is ambiguous and raises: set loss.clip_quick_gelu. A `local-dir:` model follows
    the `quick_gelu` of its own open_clip_config.json (nothing is forced).
    """
    import open_clip

    if quick_gelu is not None:
        return bool(quick_gelu)
    if arch.startswith("local-dir:") or not pretrained or arch.endswith("-quickgelu"):
        return False  # the config decides
    tag = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag:
        return bool(tag.get("quick_gelu", False))
    if ".openai" in pretrained.lower() or _is_torchscript(pretrained):
        return True
    raise ValueError(f"cannot tell whether the CLIP weights {pretrained} were trained with QuickGELU "
                     f"(OpenAI's were): set loss.clip_quick_gelu=true or false")


def _is_torchscript(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
