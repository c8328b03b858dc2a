"""Tiny models with the real classes, written to disk in the real formats.

No hub access here, so tests, CPU benchmarks and smoke runs build tiny Stable Diffusion and
open_clip models from configs, save them where a downloaded model would sit, and load them back
through the project's real loading code (`from_pretrained`, `create_model_and_transforms`).
They have random weights and are useless for anything but exercising code paths.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import List

import torch

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_clip_tokenizer_files(directory: str) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer from open_clip's shipped BPE file;
    ids equal `open_clip.tokenize`."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    Path(directory, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    Path(directory, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_sd(directory: str, seed: int = 0) -> str:
    """A diffusers Stable Diffusion directory (vae, unet, text_encoder, tokenizer, scheduler) with
    SD-2.1-like structure at toy width: VAE factor 8, linear-projection cross-attention."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    root = Path(directory)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, use_linear_projection=True,
    ).save_pretrained(root / "unet")
    write_clip_tokenizer_files(str(root / "tokenizer"))
    CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                  model_max_length=77).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
                  ).save_pretrained(root / "text_encoder")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return str(root)


def build_tiny_clip(directory: str, seed: int = 0) -> str:
    """An open_clip `local-dir:` model (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "open_clip_model.safetensors")
    (root / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}))
    return f"local-dir:{root}"


def tiny_overrides(directory: str) -> List[str]:
    """Build (once) the tiny SD and CLIP under `directory`; return the overrides that point the
    `tiny` preset at them."""
    root = Path(directory)
    if not (root / "sd" / "model_index.json").exists():
        build_tiny_sd(str(root / "sd"))
    clip = f"local-dir:{root / 'clip'}"
    if not (root / "clip" / "open_clip_config.json").exists():
        clip = build_tiny_clip(str(root / "clip"))
    return [f"model.pretrained={root / 'sd'}", f"loss.clip_arch={clip}", "loss.clip_pretrained="]


def tiny_config(directory: str, extra=()) -> "object":
    from .config import resolve

    return resolve("tiny", [*tiny_overrides(directory), *extra])


SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
)
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)


def build_random_sd21(directory: str, seed: int = 0) -> str:
    """A diffusers directory with SD 2.1-base shapes (UNet 865M, VAE 84M), random weights, for
    GPU benchmarks only. The text encoder is a 1-layer stand-in of width 1024: it is run once,
    for the empty-prompt embedding, so its depth does not affect any timing."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    root = Path(directory)
    AutoencoderKL(**SD21_BASE_VAE).save_pretrained(root / "vae")
    UNet2DConditionModel(**SD21_BASE_UNET).save_pretrained(root / "unet")
    write_clip_tokenizer_files(str(root / "tokenizer"))
    CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                  model_max_length=77).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1,
                                 num_attention_heads=16, max_position_embeddings=77, projection_dim=1024)
                  ).save_pretrained(root / "text_encoder")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    return str(root)
