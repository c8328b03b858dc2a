"""Checkpoint directories: trainable weights in safetensors (LoRA in peft/diffusers format),
EMA target, discriminator heads, optimiser and RNG state, and the resolved config.

Layout:  README.md (model card)  config.json  meta.json  student/  target/
         disc_heads.safetensors  train_state.pt
`student/` and `target/` hold `pytorch_lora_weights.safetensors` in diffusers' SD LoRA layout:
`StableDiffusionPipeline.from_pretrained(base).load_lora_weights("CKPT/student")` loads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Optional

import torch

from .backbones import build_backbone
from .config import FlowSRConfig

CONFIG_NAME = "config.json"
META_NAME = "meta.json"
STATE_NAME = "train_state.pt"
CARD_NAME = "README.md"
DISC_NAME = "disc_heads.safetensors"
INFERENCE_OPTION = "--pretrained"  # how upscale / evaluate override the base model (weight hints)


def save_checkpoint(directory: str, *, cfg: FlowSRConfig, stage: int, step: int, models, optimizers,
                    generator: Optional[torch.Generator] = None, extra: Optional[dict] = None,
                    metrics: Optional[dict] = None) -> None:
    """Write checkpoint `directory`; `metrics` (loss terms, validation PSNR at this step) go into
    its model card."""
    from safetensors.torch import save_file

    from .backbones.common import unwrap

    os.makedirs(directory, exist_ok=True)
    cfg.save(os.path.join(directory, CONFIG_NAME))
    models.student.save_trainable(os.path.join(directory, "student"))
    if models.target is not None:
        models.target.save(os.path.join(directory, "target"))
    if models.disc is not None:
        save_file({k: v.detach().contiguous() for k, v in unwrap(models.disc).state_dict().items()},
                  os.path.join(directory, DISC_NAME))
    state = {"optimizers": [o.state_dict() if o is not None else None for o in optimizers],
             "generator": generator.get_state() if generator is not None else None}
    torch.save(state, os.path.join(directory, STATE_NAME))
    with open(os.path.join(directory, META_NAME), "w") as f:
        json.dump({"stage": stage, "step": step, **(extra or {})}, f)
    with open(os.path.join(directory, CARD_NAME), "w") as f:
        f.write(model_card(cfg, stage=stage, step=step, metrics=metrics))


def model_card(cfg: FlowSRConfig, *, stage: int, step: int, metrics: Optional[dict] = None) -> str:
    """A Hugging Face model card (README.md) for a checkpoint: what it is, what it needs, how to run it."""
    m = cfg.model
    sd = m.backbone == "sd"
    steps = 1 if stage == 2 else cfg.schedule.n_fast
    front = ["---", "library_name: diffusers" if sd else "library_name: pytorch",
             *([f"base_model: {m.pretrained}"] if sd else []),
             "pipeline_tag: image-to-image", "tags:", "- super-resolution", "- flowsr",
             *(["- lora"] if sd else []), "---", ""]
    base = (f"LoRA (rank {m.lora_rank}, alpha {m.lora_alpha}) on the UNet of `{m.pretrained}`; "
            f"the base model is loaded from there (pass `--pretrained DIR` to use a local copy)."
            if sd else "A pixel-space UNet trained from scratch (no base model).")
    lines = [*front, f"# FlowSR x{cfg.data.scale} ({cfg.name}, stage {stage}, step {step})", "",
             "One-step image super-resolution via consistency rectified flow (FlowSR), trained with "
             "FlowSR on Ray.", "",
             "| | |", "|---|---|",
             f"| preset | `{cfg.name}` |", f"| stage | {stage} ({'flow' if stage == 1 else 'consistency distillation'}) |",
             f"| training steps | {step} |", f"| scale | x{cfg.data.scale} |",
             f"| backbone | `{m.backbone}` |", f"| suggested sampling steps | {steps} |", "", base, ""]
    known = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and k not in ("stage", "step")}
    if known:
        lines += ["## Metrics at this step", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" for k, v in sorted(known.items())], ""]
    else:
        lines += ["## Metrics", "", "Not measured at this step (run `flowsr evaluate --checkpoint CKPT`).", ""]
    lines += ["## How to run it", "", "```bash",
              f"flowsr upscale -i IN -o OUT --checkpoint CKPT --steps {steps}",
              f"python -m jobs.upscale -i IN -o OUT --checkpoint CKPT --steps {steps}", "```", "",
              "```python", "from PIL import Image", "from flowsr.api import FlowSRUpscaler", "",
              f"upscaler = FlowSRUpscaler.from_pretrained(\"CKPT\", steps={steps})",
              "upscaler(Image.open(\"in.png\")).save(\"out.png\")", "```", ""]
    multiple = (f"{2 ** (len(m.pixel_channels) - 1)}" if not sd else
                "8 x the UNet's down-sampling, 64 for SD 2.1")
    lines += ["## ONNX", "",
              "```bash", "flowsr export CKPT model.onnx          # --dtype fp16: half precision inside",
              "flowsr upscale -i IN -o OUT -m model.onnx --backend onnxruntime", "```", "",
              "The one-step model with the LoRA merged, batch, height and width dynamic; the export runs the "
              "file in onnxruntime and refuses to write it when it differs from torch. Input `lr_up`: float32 "
              "(batch, 3, height, width), NCHW RGB in [-1, 1], the LR resized bicubically (OpenCV / PyTorch "
              f"bicubic) to the output size (x{cfg.data.scale} in training), height and width multiples of "
              f"the size multiple ({multiple}; the file's `flowsr.size_multiple` metadata): replicate-pad, then "
              "crop. Output `sr`: the same shape in [-1, 1], not colour-corrected (the upscale job applies "
              "the wavelet colour fix).", ""]
    if sd:
        lines += ["The LoRA alone, in a stock diffusers pipeline (its sampler is not FlowSR's):", "",
                  "```python", "from diffusers import StableDiffusionPipeline", "",
                  f"pipe = StableDiffusionPipeline.from_pretrained(\"{m.pretrained}\")",
                  "pipe.load_lora_weights(\"CKPT/student\")", "```", ""]
    return "\n".join(lines)


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META_NAME)) as f:
        return json.load(f)


def load_checkpoint(directory: str, *, models, optimizers, generator: Optional[torch.Generator] = None) -> dict:
    """Restore weights, optimisers and RNG in place; returns the meta dict (stage, step, ...)."""
    from safetensors.torch import load_file

    from .backbones.common import unwrap

    models.student.load_trainable(os.path.join(directory, "student"))
    if models.target is not None:
        models.target.load(os.path.join(directory, "target"))
    if models.disc is not None and os.path.exists(os.path.join(directory, DISC_NAME)):
        unwrap(models.disc).load_state_dict(load_file(os.path.join(directory, DISC_NAME)))
    state = torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        if opt is not None and opt_state is not None:
            opt.load_state_dict(opt_state)
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    return read_meta(directory)


def check_checkpoint(directory: str, *, weights: str = "student") -> FlowSRConfig:
    """The config of inference checkpoint `directory`, after checking that it parses and that the
    `weights` folder is there; FileNotFoundError / ValueError (one line) otherwise. Loads no weights."""
    if weights not in ("student", "target"):
        raise ValueError(f"unknown weights: {weights!r} (student | target)")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint folder at {directory}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a FlowSR checkpoint (no {CONFIG_NAME})")
    try:
        cfg = FlowSRConfig.load(path)
    except Exception as err:  # noqa: BLE001 — any parse failure is the same user-facing problem
        raise ValueError(f"{path} is not a valid FlowSR config ({type(err).__name__}: {err})") from err
    folder = os.path.join(directory, weights)
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise FileNotFoundError(f"{directory} has no {weights!r} weights (expected the folder {folder})")
    return cfg


def load_for_inference(directory: str, *, device=None, pretrained: Optional[str] = None,
                       weights: str = "student"):
    """A backbone with the trained weights of checkpoint `directory`, in eval mode.
    `pretrained` overrides the base model location recorded in the config (SD backbone)."""
    if weights not in ("student", "target"):
        raise ValueError(f"unknown weights: {weights!r} (student | target)")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a FlowSR checkpoint (no {CONFIG_NAME})")
    cfg = FlowSRConfig.load(path)
    if pretrained:
        cfg = replace(cfg, model=replace(cfg.model, pretrained=pretrained))
    backbone = build_backbone(cfg.model, device=device, option=INFERENCE_OPTION)
    backbone.load_trainable(os.path.join(directory, weights))
    return backbone.eval().requires_grad_(False), cfg
