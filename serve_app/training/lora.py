"""Stage 4: a style LoRA for the base UNet: "outline" (each shape drawn as its outline in
its colour, the inside left the background's), in diffusers/PEFT format.

Contract (`train_lora(...)`):
- PEFT LoRA adapters (rank `RANK`) on the UNet's attention projections and on its ResNet
  convolutions: the 16x16 level has no attention, and an outline is a fine-grained change,
  so attention alone would not reach it.
- Trained on the same captions as the base model, with the pictures rendered in the
  outline style (latents cached once, `data.LatentCache(style="outline")`); the base UNet
  and the text encoder are frozen. Captions never name the style: loading the LoRA (scale
  1) is what asks for it, scale 0 gives the base model's image exactly.
- `save_lora(unet, folder)` writes `pytorch_lora_weights.safetensors` with
  `StableDiffusionPipeline.save_lora_weights` (keys `unet.…lora_A/lora_B…`, PEFT's names
  as they are), which `pipe.load_lora_weights(folder)` reads. Not through
  `convert_state_dict_to_diffusers`: it renames the attention layers' keys to the old
  `lora.down/lora.up` and leaves the convolutions' alone, and diffusers then loads the
  convolutions only (with a warning), silently dropping the attention half of the style.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from serve_app.training.common import Ema, Progress, lr_at, set_lr
from serve_app.training.data import LatentCache, captions_for, scenes, tokenize
from serve_app.training.denoiser import CAPTION_DROPOUT, velocity_loss
from serve_app.training.models import IMAGE_SIZE, SEEDS
from serve_app.training.parallel import average_gradients, stream

RANK = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def train_lora(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
               base_unet: UNet2DConditionModel, steps: int, batch: int = 64,
               lr: float = 1e-3, pool: int = 6000, seed: int = 0,
               log_path: Path | None = None) -> UNet2DConditionModel:
    """The base UNet (a copy) with the trained adapter `style` added."""
    from peft import LoraConfig

    rng = np.random.default_rng(stream(seed + SEEDS["lora"]))
    generator = torch.Generator().manual_seed(stream(seed + SEEDS["lora"]))
    progress = Progress("lora", steps, log_path)
    cache = LatentCache.build(vae.eval(), scenes(rng, pool), IMAGE_SIZE, style="outline")
    unet = copy.deepcopy(base_unet).requires_grad_(False)
    torch.manual_seed(seed + SEEDS["lora"])
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS,
                                init_lora_weights="gaussian"), adapter_name="default")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    text_encoder = text_encoder.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = Ema(torch.nn.ParameterList(params), 0.995)
    unet.train()
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        index = torch.randint(0, len(cache), (batch,), generator=generator)
        captions = captions_for([cache.scenes[i] for i in index.tolist()], rng,
                                CAPTION_DROPOUT)
        with torch.no_grad():
            states = text_encoder(tokenize(tokenizer, captions))[0]
        loss = velocity_loss(unet, cache.sample(index, generator), states, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        optimizer.step()
        ema.update()
        progress.step(loss=loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            progress.log(f"loss {loss.item():.4f}")
    progress.close()
    ema.copy_to(torch.nn.ParameterList(params))
    return unet.eval()


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              safe_serialization=True)
    return Path(folder) / LORA_FILE
