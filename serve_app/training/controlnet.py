"""Stage 5: a canny ControlNet (diffusers `ControlNetModel`) for the base model: the shape
follows the control image's edges.

Contract (`train_controlnet(...)`):
- The net starts as a copy of the base UNet's encoder (`ControlNetModel.from_unet`, zero
  convolutions out), with a 3-stage conditioning embedding that brings the control image
  to the 1/4 latent grid; the UNet and the text encoder are frozen.
- Control images are what the service feeds it (`preprocess: canny`): OpenCV's Canny edges
  (thresholds 100, 200) of the target picture, white on black, 3 channels, in [0, 1] as
  `StableDiffusionControlNetPipeline` prepares them.
- Pictures are placed and sized anywhere (`world.wide_scene`), not only at the anchors, so
  the edges, not the words, decide where the shape is and how large; captions name
  position and size only half the time (and name the nearest anchor when they do).
- EMA weights are returned; `save_pretrained` of the result is a ControlNet folder that
  `ControlNetModel.from_pretrained` reads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from serve_app.training import world
from serve_app.training.common import Ema, Progress, descend, lr_at, set_lr
from serve_app.training.data import LatentCache, tokenize
from serve_app.training.denoiser import CAPTION_DROPOUT
from serve_app.training.models import IMAGE_SIZE, SEEDS, new_controlnet, train_scheduler
from serve_app.training.parallel import stream

CANNY_LOW, CANNY_HIGH = 100, 200  # the service's (serve_app.generation.controlnets)


def canny(image: Image.Image) -> np.ndarray:
    """Canny edges as the service computes them: uint8 (H, W), 255 on edges."""
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)


def control_image(image: Image.Image) -> Image.Image:
    edges = canny(image)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_caption(scene: world.Scene, rng: np.random.Generator) -> str:
    if rng.random() < CAPTION_DROPOUT:
        return ""
    text = world.caption(scene, rng, omit=False)
    for attribute, phrases in (("position", world.POSITION_PHRASES[scene.position]),
                               ("size", (scene.size,))):
        if rng.random() < 0.5:
            for phrase in sorted(phrases, key=len, reverse=True):
                if f" {phrase}" in f" {text}":
                    text = f" {text}".replace(f" {phrase}", "", 1).strip()
                    break
        del attribute
    return " ".join(text.split())


def train_controlnet(vae: AutoencoderKL, text_encoder: CLIPTextModel,
                     tokenizer: CLIPTokenizer, base_unet: UNet2DConditionModel, steps: int,
                     batch: int = 64, lr: float = 5e-4, pool: int = 6000, seed: int = 0,
                     log_path: Path | None = None) -> ControlNetModel:
    rng = np.random.default_rng(stream(seed + SEEDS["controlnet"]))
    generator = torch.Generator().manual_seed(stream(seed + SEEDS["controlnet"]))
    progress = Progress("controlnet", steps, log_path)
    pool_scenes = [world.wide_scene(rng) for _ in range(pool)]
    cache = LatentCache.build(vae.eval(), pool_scenes, IMAGE_SIZE)
    controls = torch.from_numpy(np.stack([
        canny(world.render(s, IMAGE_SIZE)) for s in pool_scenes])).float()[:, None] / 255.0
    unet = copy.deepcopy(base_unet).eval().requires_grad_(False)
    net = new_controlnet(unet).train()
    text_encoder = text_encoder.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    ema = Ema(net, 0.998)
    scheduler = train_scheduler()
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        index = torch.randint(0, len(cache), (batch,), generator=generator)
        latents = cache.sample(index, generator)
        with torch.no_grad():
            states = text_encoder(tokenize(tokenizer, [
                control_caption(cache.scenes[i], rng) for i in index.tolist()]))[0]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                          generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        down, mid = net(noisy, t, states, controlnet_cond=controls[index].expand(-1, 3, -1, -1),
                        return_dict=False)
        prediction = unet(noisy, t, states, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = (prediction - scheduler.get_velocity(latents, noise, t)).pow(2).mean()
        descend(optimizer, loss, net.parameters(), ema)
        progress.step(loss=loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            progress.log(f"loss {loss.item():.4f}")
    progress.close()
    ema.copy_to(net)
    return net.eval()
