"""Assembling and saving the trained modules as diffusers pipelines.

Contract:
- `assemble(...)` builds a `StableDiffusionPipeline` (or, with a 9-channel UNet,
  `StableDiffusionInpaintPipeline`) from in-memory modules, with the scheduler of the
  default sampler derived from the training schedule, and no safety checker (an
  integration may add one: `requires_safety_checker=False`).
- `save(pipe, folder)` writes it with `save_pretrained(safe_serialization=True)`: the
  folder then loads with `<Pipeline>.from_pretrained(folder)` like a real checkpoint. The
  UNet and VAE weights are stored in float16 (half the bytes: the whole set of shipped
  weights must stay under 30 MB); diffusers loads them as float32 unless asked otherwise,
  and the rounding (~5e-4 relative) changes no judged attribute. The text encoder stays
  float32 (transformers would keep float16 on load, and it is small).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from serve_app.training.evaluate import DEFAULTS, set_sampler
from serve_app.training.models import train_scheduler


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
             unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    cls = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else \
        StableDiffusionPipeline
    pipe = cls(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
               unet=unet.eval(), scheduler=train_scheduler(), safety_checker=None,
               feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    set_sampler(pipe, DEFAULTS["sampler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(pipe: StableDiffusionPipeline, folder: Path) -> Path:
    halves = {name: copy.deepcopy(getattr(pipe, name)).half() for name in ("unet", "vae")}
    stored = type(pipe)(**{**pipe.components, **halves}, requires_safety_checker=False)
    stored.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_half(module: torch.nn.Module, folder: Path) -> Path:
    """`save_pretrained` of a float16 copy of a diffusers model (a ControlNet)."""
    copy.deepcopy(module).half().save_pretrained(folder, safe_serialization=True)
    return Path(folder)
