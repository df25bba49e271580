"""Stage 1: the VAE (AutoencoderKL, 3 blocks, f=4), trained from scratch on the world.

Contract (`train_vae(out, steps, ...)`):
- Reconstruction loss L1 + MSE on [-1, 1] pixels (L1 keeps the shapes' edges sharp, MSE
  the flat colours exact) plus a small KL term, which keeps the latents near a unit
  Gaussian and smooth for the denoiser, at no visible cost.
- Trained on `data.vae_batch`: filled pictures, outlines (the LoRA's style) and masked
  pictures (the inpainting pipeline's input), rendered on the fly, as 32x32 windows
  (mostly around the shape's edge: 4x cheaper per picture than whole ones, and no step
  is spent on flat background).
- At the end `scaling_factor` is set in the config to 1 / std of the scaled latents of
  world pictures, as SD's 0.18215 is (the denoiser then sees unit-variance latents).
- Saves a diffusers folder (`save_pretrained`, safetensors) at `out` and returns the VAE,
  with its reconstruction figures: per-pixel MSE and the judge's accuracy on decoded
  pictures (every error here is an error in every generated image: the VAE this stage
  shipped for `shapes-2` gives back 74.6 % of shapes, its small squares and triangles with
  rounded corners and soft rims; the `decoder` stage sharpens it, see `decoder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from serve_app.training import judge as judging
from serve_app.training import world
from serve_app.training.common import Progress, descend, lr_at, set_lr
from serve_app.training.data import to_images, to_tensor, vae_batch
from serve_app.training.models import IMAGE_SIZE, new_vae
from serve_app.training.parallel import stream

KL_WEIGHT = 1e-5


def train_vae(out: Path, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0,
              log_path: Path | None = None, crop: int | None = 32
              ) -> tuple[AutoencoderKL, dict[str, float]]:
    rng = np.random.default_rng(stream(seed))
    generator = torch.Generator().manual_seed(stream(seed))
    vae = new_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress("vae", steps, log_path)
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        x = vae_batch(rng, batch, IMAGE_SIZE, crop)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape,
                                                         generator=generator)
        reconstruction = vae.decode(z).sample
        error = reconstruction - x
        kl = posterior.kl().mean() / z[0].numel()
        loss = reconstruction_loss(error) + KL_WEIGHT * kl
        descend(optimizer, loss, vae.parameters())
        progress.step(loss=loss.item(), mse=error.detach().pow(2).mean().item())
        if (step + 1) % max(1, steps // 10) == 0:
            progress.log(f"loss {loss.item():.4f} mse {error.detach().pow(2).mean().item():.5f} "
                         f"kl {kl.item():.3f}")
    vae.eval()
    set_scaling_factor(vae, seed)
    figures = reconstruction_figures(vae, seed)
    progress.log(f"done: {figures}")
    progress.close()
    vae.save_pretrained(out, safe_serialization=True)
    return vae, figures


def reconstruction_loss(error: torch.Tensor) -> torch.Tensor:
    """L1 + MSE of a reconstruction's error on [-1, 1] pixels (see the module docstring)."""
    return error.abs().mean() + error.pow(2).mean()


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, seed: int, n: int = 512) -> float:
    rng = np.random.default_rng(seed + 1)
    images = to_tensor([world.render(world.random_scene(rng), IMAGE_SIZE) for _ in range(n)])
    latents = vae.encode(images).latent_dist.sample()
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(factor, 5))
    return factor


@torch.no_grad()
def reconstruction_figures(vae: AutoencoderKL, seed: int, n: int = 256) -> dict[str, float]:
    rng = np.random.default_rng(seed + 2)
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = to_tensor([world.render(s, IMAGE_SIZE) for s in scenes])
    decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample
    scores = judging.score((judging.judge(im) for im in to_images(decoded)),
                           (s.attributes() for s in scenes))
    mse = float((decoded.clamp(-1, 1) - images).pow(2).mean())
    worst = min(scores.values())
    return {"mse": round(mse, 6), "judge_min": round(worst, 4),
            **{f"judge_{k}": round(v, 4) for k, v in scores.items()},
            "scaling_factor": float(vae.config.scaling_factor)}
