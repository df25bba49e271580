"""Torch batches of the shapes world: pictures as tensors, captions as token ids, random
inpainting masks, and a cache of VAE latents.

Contract:
- Pictures are float tensors (B, 3, H, W) in [-1, 1], as diffusers' VAEs take them.
- `vae_batch` mixes what the VAE must reproduce: world pictures (near the anchors and
  anywhere), the LoRA's outline style, and pictures with a grey hole (the inpainting
  pipeline's masked image: the hole is 0 in [-1, 1]).
- `random_mask(rng, px)`: a boolean mask (True = repaint) of one to three rectangles,
  ellipses or brush strokes, or a box around the picture's shape: the masks people paint.
- `LatentCache` encodes a seeded pool of scenes once with a frozen VAE (posterior mean
  and std) and hands out latents sampled from it, with each scene's attributes: the
  denoiser's training never runs the VAE encoder. `encoded_pool` remembers the last one,
  so the denoiser's stages in one run encode their shared pool once.
Every function draws only from the `numpy.random.Generator` or `torch.Generator` it is
given: seeded = reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from serve_app.training import world
from serve_app.training.world import Scene


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(tensor: torch.Tensor) -> list[Image.Image]:
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def scenes(rng: np.random.Generator, n: int, wide: float = 0.0) -> list[Scene]:
    """`n` random scenes; a fraction `wide` of them placed and sized anywhere."""
    return [world.wide_scene(rng) if rng.random() < wide else world.random_scene(rng)
            for _ in range(n)]


def random_mask(rng: np.random.Generator, px: int, scene: Scene | None = None) -> np.ndarray:
    image = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(image)
    if scene is not None and rng.random() < 0.4:
        # A box around the shape, a little larger: "replace the object".
        x0, y0, x1, y1 = world.box(scene, px)
        grow = rng.uniform(0.1, 0.5) * (x1 - x0)
        draw.rectangle((x0 - grow, y0 - grow, x1 + grow, y1 + grow), fill=255)
    else:
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(3)
            x0, y0 = rng.uniform(-0.1, 0.9, 2) * px
            w, h = rng.uniform(0.15, 0.7, 2) * px
            if kind == 0:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=255)
            elif kind == 1:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=255)
            else:
                points = [tuple(p) for p in rng.uniform(0, px, (int(rng.integers(2, 5)), 2))]
                draw.line(points, fill=255, width=int(rng.uniform(0.06, 0.2) * px))
    return np.asarray(image) > 127


def vae_batch(rng: np.random.Generator, n: int, px: int, crop: int | None = None
              ) -> torch.Tensor:
    """`n` pictures of `px`, or `crop` x `crop` windows of them: a window around the
    shape's edge most of the time, anywhere otherwise (the VAE is convolutional, so it
    learns from windows what it does on whole pictures, at a fraction of the cost: most of
    a picture is flat background)."""
    images = []
    for scene in scenes(rng, n, wide=0.3):
        u = rng.random()
        if u < 0.15:
            images.append(world.render(scene, px, "outline"))
        elif u < 0.3:
            array = np.asarray(world.render(scene, px)).copy()
            array[random_mask(rng, px, scene)] = 128  # ~0 in [-1, 1]: a masked image
            images.append(Image.fromarray(array))
        else:
            images.append(world.render(scene, px))
        if crop is not None:
            images[-1] = _window(images[-1], scene, crop, rng)
    return to_tensor(images)


def _window(image: Image.Image, scene: Scene, crop: int, rng: np.random.Generator
            ) -> Image.Image:
    px = image.width
    if rng.random() < 0.75:
        x0, y0, x1, y1 = world.box(scene, px)
        cx, cy = (x0 + x1) / 2 + rng.uniform(-0.4, 0.4) * crop, \
            (y0 + y1) / 2 + rng.uniform(-0.4, 0.4) * crop
    else:
        cx, cy = rng.uniform(0, px, 2)
    # Aligned to the VAE's 4-pixel grid, so windows see edges where whole pictures do.
    left = int(np.clip(round((cx - crop / 2) / 4) * 4, 0, px - crop))
    top = int(np.clip(round((cy - crop / 2) / 4) * 4, 0, px - crop))
    return image.crop((left, top, left + crop, top + crop))


@dataclass
class LatentCache:
    """Posterior means and stds of a pool of scenes, scaled by the VAE's scaling factor."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor
    scenes: list[Scene]

    @classmethod
    @torch.no_grad()
    def build(cls, vae: torch.nn.Module, pool: list[Scene], px: int, batch: int = 128,
              style: str = "filled") -> LatentCache:
        means, stds = [], []
        factor = vae.config.scaling_factor
        for i in range(0, len(pool), batch):
            images = to_tensor([world.render(s, px, style) for s in pool[i:i + batch]])
            dist = vae.encode(images).latent_dist
            means.append(dist.mean * factor)
            stds.append(dist.std * factor)
        return cls(torch.cat(means), torch.cat(stds), list(pool))

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[index].shape, generator=generator)
        return self.mean[index] + self.std[index] * noise

    def __len__(self) -> int:
        return len(self.scenes)


# The last pool `encoded_pool` built: the denoiser's stages share it (one ~2 min encode of
# 20,000 scenes instead of one per stage).
_POOL: dict[tuple, LatentCache] = {}


def encoded_pool(vae: torch.nn.Module, n: int, seed: int, px: int) -> LatentCache:
    """`LatentCache.build` of `n` scenes drawn from `seed`, remembered while the same encoder
    weights ask again (a stage loads the VAE afresh: equal weights, another object)."""
    digest = hashlib.sha1()
    for module in (vae.encoder, vae.quant_conv):
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    key = (digest.hexdigest(), n, seed, px)
    if key not in _POOL:
        _POOL.clear()
        _POOL[key] = LatentCache.build(vae.eval(), scenes(np.random.default_rng(seed), n), px)
    return _POOL[key]


def shape_weights(scenes_: Sequence[Scene], px: int, factor: int, boost: float,
                  corners: float = 0.0) -> torch.Tensor:
    """Per-latent-pixel loss weights (B, 1, px/factor, px/factor): 1 + `boost` on the
    shape's box grown by one latent pixel, + `corners` times `shape_disagreement` (where a
    circle, a square and a triangle in that box differ), normalised to mean 1 per picture.
    Why: most of a picture is flat background, learned within a few hundred steps; the
    shape (a few % of the pixels) is what carries colour, position, size and shape, and
    what tells the three shapes apart is a few latent pixels at the box's corners and
    sides (see `denoiser.train_corners`)."""
    grid = px // factor
    weights = torch.ones(len(scenes_), 1, grid, grid)
    for i, scene in enumerate(scenes_):
        x0, y0, x1, y1 = (v / factor for v in world.box(scene, px))
        weights[i, 0, max(0, int(y0) - 1):int(np.ceil(y1)) + 1,
                max(0, int(x0) - 1):int(np.ceil(x1)) + 1] += boost
        if corners:
            weights[i, 0] += corners * torch.from_numpy(shape_disagreement(scene, px, factor))
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def shape_disagreement(scene: Scene, px: int, factor: int) -> np.ndarray:
    """(px/factor, px/factor): per latent pixel, the largest difference in covered area
    between the three shapes drawn in `scene`'s box (0 outside the box and at its middle,
    up to 1 at a square's corners, where a circle and a triangle leave the background)."""
    grid = px // factor
    covered = []
    for shape in world.SHAPES:
        mask = Image.new("L", (px, px), 0)
        world.draw_shape(ImageDraw.Draw(mask), shape, world.box(scene, px), 255)
        covered.append(np.asarray(mask, dtype=np.float32)
                       .reshape(grid, factor, grid, factor).mean(axis=(1, 3)) / 255)
    stacked = np.stack(covered)
    return stacked.max(axis=0) - stacked.min(axis=0)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as the SD pipelines make them: padded to 77 with the pad (= EOS) token."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def captions_for(scenes_: Sequence[Scene], rng: np.random.Generator, dropout: float,
                 omit: bool = True) -> list[str]:
    """A fresh caption per scene; a fraction `dropout` of them empty (what classifier-free
    guidance's unconditional branch sees: the pipelines encode the empty negative prompt)."""
    return ["" if rng.random() < dropout else world.caption(s, rng, omit=omit)
            for s in scenes_]
