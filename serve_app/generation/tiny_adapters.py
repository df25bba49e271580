"""Seeded test adapters for the embedded tiny models: a LoRA and a ControlNet.

Like the tiny models (`serve_app.generation.tiny`), they are built locally from a config
and saved exactly as the real ones ship, so they load through the real code path:
- a LoRA: PEFT `LoraConfig` adapters on the denoiser's attention projections (`to_q`,
  `to_k`, `to_v`, `to_out.0`; the same names in SD/SDXL UNets and FLUX/SD 3
  transformers), weights drawn from the registry entry's `seed`, saved with the pipeline
  class's `save_lora_weights` (diffusers/PEFT safetensors, `unet.…` or `transformer.…`
  keys), which `load_lora_weights` reads;
- a ControlNet: `ControlNetModel.from_unet` on the tiny UNet's config (its own seeded
  weights, not the UNet's), saved with `save_pretrained`. A freshly made ControlNet's
  output convolutions are zero (training starts from "no effect"); here they are drawn from
  the seed too, so the control image visibly steers the image.

The denoiser's *config* is all that is read from the model: the adapter is the same
whatever its weights, so one built for `tiny-sd` also fits `tiny-sd-inpaint`, whose UNet
differs in its input convolution only. Builds are atomic and serialized by a file lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from filelock import FileLock

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_RANK = 4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Four stages, three of them stride 2: the control image is brought to latent size (1/8).
CONTROL_EMBEDDING_CHANNELS = (8, 8, 16, 16)
_WEIGHT_STD = 0.1


def ensure_tiny_lora(target_dir: Path, pipe: DiffusionPipeline, denoiser_attr: str,
                     seed: int) -> Path:
    """The tiny LoRA file for `pipe`'s denoiser, built into `target_dir` unless there."""
    return _atomic(Path(target_dir), LORA_FILE,
                   lambda folder: write_tiny_lora(folder, pipe, denoiser_attr, seed))


def ensure_tiny_controlnet(target_dir: Path, unet_config: Any, seed: int) -> Path:
    """The tiny ControlNet folder for a UNet of `unet_config`, built unless there."""
    _atomic(Path(target_dir), "config.json",
            lambda folder: tiny_controlnet(unet_config, seed).save_pretrained(
                folder, safe_serialization=True))
    return Path(target_dir)


def write_tiny_lora(folder: Path, pipe: DiffusionPipeline, denoiser_attr: str,
                    seed: int) -> None:
    """Save a seeded LoRA for `pipe`'s denoiser in `folder` (see the module docstring)."""
    from peft import LoraConfig, get_peft_model_state_dict

    live = getattr(pipe, denoiser_attr)
    # A fresh module of the same config: the live one may carry other adapters already.
    denoiser = type(live).from_config(live.config)
    denoiser.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK,
                                    target_modules=list(LORA_TARGETS),
                                    init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * _WEIGHT_STD)
    layers = get_peft_model_state_dict(denoiser)
    type(pipe).save_lora_weights(folder, safe_serialization=True,
                                 **{f"{denoiser_attr}_lora_layers": layers})


def tiny_controlnet(unet_config: Any, seed: int) -> ControlNetModel:
    """A seeded ControlNet for a UNet of `unet_config` (see the module docstring)."""
    unet = UNet2DConditionModel.from_config(unet_config)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                    conditioning_embedding_out_channels=CONTROL_EMBEDDING_CHANNELS)
    zero_init = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                 net.controlnet_cond_embedding.conv_out]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in zero_init:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * _WEIGHT_STD)
    return net.eval()


def _atomic(target_dir: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` into a staging folder and rename it to `target_dir`, under a
    file lock, unless `target_dir/marker` exists (then nothing is built)."""
    if (target_dir / marker).is_file():
        return target_dir / marker
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir.parent / f".{target_dir.name}.lock")):
        if (target_dir / marker).is_file():
            return target_dir / marker
        staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.build-",
                                        dir=target_dir.parent))
        try:
            write(staging / "out")
            shutil.rmtree(target_dir, ignore_errors=True)  # a leftover without its marker
            os.rename(staging / "out", target_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target_dir / marker
