"""Stage 3: the 9-channel inpainting UNet (`StableDiffusionInpaintPipeline` layout),
fine-tuned from the base UNet on random masks.

Contract (`train_inpaint(...)`):
- The UNet's input is [noisy latents (4), mask (1), masked-image latents (4)], exactly what
  `StableDiffusionInpaintPipeline` concatenates: the mask is the picture's mask (True =
  repaint) resized to the latent grid, the masked image is the picture with the mask's
  pixels set to 0 in [-1, 1], encoded by the VAE (a posterior sample, times the scaling
  factor).
- It starts as the base UNet, with the 5 new input channels' weights at zero (so it begins
  as the text-to-image model and learns to use what it is shown); the text encoder is the
  base's, frozen (the inpainting pipeline ships the same one).
- Masks: `data.random_mask` (boxes around the shape, rectangles, ellipses, strokes); 15 %
  of the time everything is masked, so it also draws from the text alone.
- Prompts: a fresh caption of the full target picture (10 % empty, for guidance).
- EMA weights are returned.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from serve_app.training import world
from serve_app.training.common import Ema, Progress, descend, lr_at, set_lr
from serve_app.training.data import captions_for, random_mask, scenes, to_tensor, tokenize
from serve_app.training.denoiser import CAPTION_DROPOUT, velocity_loss
from serve_app.training.models import IMAGE_SIZE, SEEDS, VAE_FACTOR
from serve_app.training.parallel import stream

FULL_MASK = 0.15


def inpaint_unet_from(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A 9-input-channel copy of `unet` whose extra input channels start at zero."""
    config = dict(unet.config)
    config["in_channels"] = 9
    new = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    extended = torch.zeros(weight.shape[0], 9, *weight.shape[2:])
    extended[:, :4] = weight
    state["conv_in.weight"] = extended
    new.load_state_dict(state)
    return new


@torch.no_grad()
def inpaint_batch(vae: AutoencoderKL, rng: np.random.Generator, generator: torch.Generator,
                  n: int) -> tuple[torch.Tensor, torch.Tensor, list[world.Scene]]:
    """(target latents, extra channels [mask, masked latents], scenes) for `n` scenes."""
    batch = scenes(rng, n, wide=0.2)
    images = to_tensor([world.render(s, IMAGE_SIZE) for s in batch])
    masks = torch.from_numpy(np.stack([
        np.ones((IMAGE_SIZE, IMAGE_SIZE), bool) if rng.random() < FULL_MASK
        else random_mask(rng, IMAGE_SIZE, s) for s in batch])).float()[:, None]
    factor = vae.config.scaling_factor
    both = vae.encode(torch.cat([images, images * (masks < 0.5)])).latent_dist
    sample = both.mean + both.std * torch.randn(both.mean.shape, generator=generator)
    latents, masked = (sample * factor).chunk(2)
    small = torch.nn.functional.interpolate(masks, size=(IMAGE_SIZE // VAE_FACTOR,) * 2)
    return latents, torch.cat([small, masked], dim=1), batch


def train_inpaint(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                  base_unet: UNet2DConditionModel, steps: int, batch: int = 64,
                  lr: float = 2e-4, seed: int = 0, log_path: Path | None = None
                  ) -> UNet2DConditionModel:
    rng = np.random.default_rng(stream(seed + SEEDS["inpaint"]))
    generator = torch.Generator().manual_seed(stream(seed + SEEDS["inpaint"]))
    unet = inpaint_unet_from(copy.deepcopy(base_unet)).train()
    text_encoder = text_encoder.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = Ema(unet, 0.998)
    progress = Progress("inpaint", steps, log_path)
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        latents, extra, batch_scenes = inpaint_batch(vae, rng, generator, batch)
        with torch.no_grad():
            states = text_encoder(tokenize(tokenizer, captions_for(
                batch_scenes, rng, CAPTION_DROPOUT)))[0]
        loss = velocity_loss(unet, latents, states, generator, extra=extra)
        descend(optimizer, loss, unet.parameters(), ema)
        progress.step(loss=loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            progress.log(f"loss {loss.item():.4f}")
    progress.close()
    ema.copy_to(unet)
    return unet.eval()
