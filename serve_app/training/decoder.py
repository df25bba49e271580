"""Stage 2e: the VAE's decoder fine-tuned on the denoiser's own latents.

Contract (`train_decoder(pipe, steps, ...) -> (vae, figures)`):
- Only the decoder (and `post_quant_conv`) learns; the encoder, its `quant_conv` and the
  `scaling_factor` stay as they are, so the latent space the denoiser, the inpainting UNet,
  the LoRA and the ControlNet were trained in does not move: no stage before or after
  needs retraining, the decoder just draws their latents better.
- Data, per step: a share `GENERATED_SHARE` of windows of the denoiser's latents, each
  decoded towards the picture it should show, and the rest the VAE stage's own batch
  (`data.vae_batch`: filled, outline and masked pictures, encoded, the posterior's mode),
  so reconstructions stay as exact as before.
- The denoiser's latents, a pool of `pool` world scenes in two kinds:
    * img2img (a share 1 - `DRAWN_SHARE`): each scene rendered, taken through img2img at
      a strength in `STRENGTHS` with a fresh caption of it (default sampler, steps and
      guidance), the final latents kept. Up to strength 0.6 the picture's layout survives,
      so the rendered scene is the right target for what the denoiser drew; what differs
      is how it drew it: soft, rounded, with colours off by a little at the rim.
    * drawn (`DRAWN_SHARE`): text-to-image from a caption of each scene, as the service
      runs it. Where the denoiser put the shape is its own choice, so the target is the
      scene's shape drawn crisp in the box where it lies (`drawn_target`); a latent whose
      decoded picture misses the scene's colours, place or size, or whose fill ratio
      plainly shows another shape (`FILL_BANDS`), is left out (about 45 %): the
      decoder learns to draw the latents crisp, not to turn one shape into another.
- Loss: L1 + MSE on [-1, 1] pixels, as the VAE stage; AdamW, warmup, cosine decay.
- Figures: the VAE stage's reconstruction figures (`vae.reconstruction_figures`).

Why: the decoder trained with the encoder (the VAE stage) had only ever seen the encoder's
latents. The denoiser's are softer, and the decoder drew them blurred: a blur that grows
each shape's box (most size misses are one size too large) and mixes a small shape's colour
with its background's. Measured on the 180-prompt quality grid with the shapes-2 denoiser
at its defaults: shape colour 86.7 -> 89.4 %, size 81.1 -> 85.6 %, shape 39.4 -> 38.3 %
(background 100 %, position 99.4 % both).

What it could not do, on img2img latents alone, was draw corners that the latents hold
only faintly: text-to-image squares came out rounded, a medium one's fill ratio about 0.89,
the judge's cut between circle and square. With the drawn share (half the pool), the same
`shapes-6` denoiser on the quality grid drawn 5 x 180 times (`bench.quality`): shape
80.1 -> 82.3 %, size 94.1 % both, colour 99.7 % both, background 100 -> 99.9 %, position
99.6 -> 99.4 %.

Three quarters of the pool drawn, the circle's band ending at 0.86 (it reached 0.93,
squarish circles were taught round, the soft corners of squares with them) and the
square's starting at 0.72 (0.78): on the training command's own denoiser (`shapes-10`'s,
the same bytes), 900 images, shape 78.6 -> 80.1 % (squares large / medium / small 77 / 64 /
12 -> 80 / 74 / 19 of 100, medium circles 82 -> 88), colour 96.0 % both, size 90.0 ->
89.4 %. Three quarters drawn with the old bands: 78.9 %
(`bench/results/2026-12-07-decoder-bands.json`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw

from serve_app.training import judge as judging
from serve_app.training import world
from serve_app.training.common import Progress, descend, lr_at, set_lr
from serve_app.training.data import to_images, to_tensor, vae_batch
from serve_app.training.evaluate import DEFAULTS, set_sampler
from serve_app.training.models import IMAGE_SIZE, VAE_FACTOR
from serve_app.training.parallel import stream
from serve_app.training.vae import reconstruction_figures, reconstruction_loss

GENERATED_SHARE = 0.6
STRENGTHS = (0.2, 0.6)
DRAWN_SHARE = 0.75  # of the pool: text-to-image latents, their targets drawn where they lie
# A text-to-image latent is kept only if its decoded fill ratio is one the asked shape
# plausibly drew: one that plainly shows another shape is not taught to become this one.
# A square rounded down to a circle's fill (0.72 and up) is still taught to be drawn
# square; a circle drawn squarish (0.86 and up, near the judge's cut at 0.89) teaches
# nothing, so no latent on that border is taught to be round.
FILL_BANDS = {"square": (0.72, 1.01), "circle": (0.62, 0.86), "triangle": (0.0, 0.75)}
EDGE_LEVEL = 0.5  # a blurred edge lies where the colour is halfway to the background's
WINDOW = 32  # pixels: an 8x8 latent window, as the VAE stage's crops


@torch.no_grad()
def denoiser_latents(pipe: StableDiffusionPipeline, scenes: list[world.Scene],
                     rng: np.random.Generator, batch: int = 32) -> torch.Tensor:
    """The (unscaled) latents img2img ends with, from each scene's picture (see the
    module docstring), one strength per batch."""
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    set_sampler(img2img, DEFAULTS["sampler"])
    img2img.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        generators = [torch.Generator().manual_seed(int(rng.integers(2**31))) for _ in chunk]
        latents = img2img(prompt=[world.caption(s, rng) for s in chunk],
                          image=[world.render(s, IMAGE_SIZE) for s in chunk],
                          strength=float(rng.uniform(*STRENGTHS)),
                          num_inference_steps=DEFAULTS["steps"],
                          guidance_scale=DEFAULTS["guidance_scale"], generator=generators,
                          output_type="latent").images
        out.append(latents / pipe.vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def drawn_latents(pipe: StableDiffusionPipeline, scenes: list[world.Scene],
                  rng: np.random.Generator, batch: int = 32
                  ) -> tuple[torch.Tensor, list[Image.Image], list[tuple[float, ...]]]:
    """Text-to-image latents (unscaled) from a caption of each scene (default sampler,
    steps and guidance), each with its target picture and box (`drawn_target`); those
    without a target are left out."""
    set_sampler(pipe, DEFAULTS["sampler"])
    pipe.set_progress_bar_config(disable=True)
    latents: list[torch.Tensor] = []
    pictures: list[Image.Image] = []
    boxes: list[tuple[float, ...]] = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        generators = [torch.Generator().manual_seed(int(rng.integers(2**31))) for _ in chunk]
        z = pipe(prompt=[world.caption(s, rng) for s in chunk],
                 num_inference_steps=DEFAULTS["steps"], guidance_scale=DEFAULTS["guidance_scale"],
                 generator=generators, output_type="latent").images
        z = z / pipe.vae.config.scaling_factor
        for scene, latent, image in zip(chunk, z, to_images(pipe.vae.decode(z).sample),
                                        strict=True):
            target = drawn_target(scene, image)
            if target is not None:
                latents.append(latent)
                pictures.append(target[0])
                boxes.append(target[1])
    if not latents:  # none kept (a smoke run's few), or none asked for
        grid = IMAGE_SIZE // VAE_FACTOR
        return torch.empty(0, pipe.vae.config.latent_channels, grid, grid), pictures, boxes
    return torch.stack(latents), pictures, boxes


def drawn_target(scene: world.Scene, image: Image.Image
                 ) -> tuple[Image.Image, tuple[float, ...]] | None:
    """What the decoder should have drawn for a text-to-image `image` of `scene`: the
    scene's shape, crisp, in its colours, in the square box where the denoiser drew it
    (centred on the edges' box, found at `EDGE_LEVEL` of the way from the background's
    colour to the shape's). None unless the judge finds the scene's background, colour,
    position and size, and a fill ratio in the shape's `FILL_BANDS`."""
    verdict = judging.judge(image)
    if (verdict.background, verdict.colour, verdict.position, verdict.size) != (
            scene.background, scene.colour, scene.position, scene.size):
        return None
    low, high = FILL_BANDS[scene.shape]
    if verdict.fill is None or not low <= verdict.fill < high:
        return None
    rgb, background, _ = judging.shape_mask(image)
    distance = np.sqrt(((rgb - background) ** 2).sum(-1))
    contrast = float(np.sqrt(((np.float32(world.PALETTE[scene.colour]) - background) ** 2).sum()))
    edges = judging.largest_component(distance > EDGE_LEVEL * contrast)
    if not edges.any():
        return None
    ys, xs = np.nonzero(edges)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    half = float(np.sqrt((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))) / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    picture = Image.new("RGB", image.size, world.PALETTE[scene.background])
    world.draw_shape(ImageDraw.Draw(picture), scene.shape, tuple(round(c) for c in box),
                     world.PALETTE[scene.colour])
    return picture, box


def windows(latents: torch.Tensor, pictures: torch.Tensor, boxes: list[tuple[float, ...]],
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One aligned `WINDOW`-pixel window per latent and its picture, placed around the
    shape (whose box is given) with a random offset: the shape's rim is what is learned."""
    grid, size = latents.shape[-1], WINDOW // VAE_FACTOR
    zs, xs = [], []
    for z, x, (x0, y0, x1, y1) in zip(latents, pictures, boxes, strict=True):
        cx, cy = ((a + b) / 2 + rng.uniform(-0.25, 0.25) * WINDOW for a, b in ((x0, x1),
                                                                               (y0, y1)))
        left, top = (int(np.clip(round((c - WINDOW / 2) / VAE_FACTOR), 0, grid - size))
                     for c in (cx, cy))
        zs.append(z[:, top:top + size, left:left + size])
        p0, q0 = top * VAE_FACTOR, left * VAE_FACTOR
        xs.append(x[:, p0:p0 + WINDOW, q0:q0 + WINDOW])
    return torch.stack(zs), torch.stack(xs)


def train_decoder(pipe: StableDiffusionPipeline, steps: int, batch: int = 32,
                  pool: int = 2400, lr: float = 3e-4, seed: int = 0,
                  log_path: Path | None = None) -> tuple[AutoencoderKL, dict[str, float]]:
    rng = np.random.default_rng(stream(seed + 4))
    generator = torch.Generator().manual_seed(stream(seed + 4))
    progress = Progress("decoder", steps, log_path)
    n_drawn = round(DRAWN_SHARE * pool)
    scenes = [world.random_scene(rng) for _ in range(pool - n_drawn)]
    drawn, drawn_pictures, drawn_boxes = drawn_latents(
        pipe, [world.random_scene(rng) for _ in range(n_drawn)], rng)
    generated = torch.cat([denoiser_latents(pipe, scenes, rng), drawn])
    pictures = to_tensor([*(world.render(s, IMAGE_SIZE) for s in scenes), *drawn_pictures])
    boxes = [*(world.box(s, IMAGE_SIZE) for s in scenes), *drawn_boxes]
    pool = len(generated)
    progress.log(f"{len(scenes)} img2img and {len(drawn)} text-to-image latents made "
                 f"({n_drawn - len(drawn)} of these left out)")
    vae = copy.deepcopy(pipe.vae).float().train()
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    n_generated = round(GENERATED_SHARE * batch)
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1)))
        index = torch.randint(0, pool, (n_generated,), generator=generator).tolist()
        z_gen, x_gen = windows(generated[index], pictures[index], [boxes[i] for i in index],
                               rng)
        x_real = vae_batch(rng, batch - n_generated, IMAGE_SIZE, WINDOW)
        with torch.no_grad():  # the posterior's mode: the encoder's sharpest latents
            z_real = vae.encode(x_real).latent_dist.mode()
        error = vae.decode(torch.cat([z_gen, z_real])).sample - torch.cat([x_gen, x_real])
        loss = reconstruction_loss(error)
        descend(optimizer, loss, trained)
        progress.step(loss=loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            progress.log(f"loss {loss.item():.4f}")
    vae.requires_grad_(False)
    vae.eval()
    figures = reconstruction_figures(vae, seed)
    progress.log(f"done: {figures}")
    progress.close()
    return vae, figures
