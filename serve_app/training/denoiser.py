"""Stage 2: the text encoder (CLIPTextModel) and the UNet, trained together from scratch on
the latents of the frozen VAE.

Contract (`train_denoiser(...)`):
- Data: a seeded pool of world scenes encoded once (`data.LatentCache`); each step draws
  a batch of scenes, samples their latents from the cached posteriors and gives each a
  fresh caption (so the model learns words, not sentences), 10 % of them empty
  (classifier-free guidance's unconditional branch).
- Objective: v-prediction on the zero-terminal-SNR schedule of `models.train_scheduler`
  (see there why), MSE weighted towards the shape's box (`data.shape_weights`), AdamW
  with warmup and cosine decay, gradient clipping.
- An EMA of both modules' weights is what gets evaluated and shipped (it is steadier and
  better than the raw weights at every point measured).
- Every `eval_every` steps the EMA pipeline draws a small quality grid (default sampler,
  steps and guidance) and the judge scores it; the best-scoring EMA weights are kept
  (score: the mean of the per-attribute fractions) and returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from serve_app.training.common import Ema, Progress, descend, lr_at, set_lr
from serve_app.training.data import (
    captions_for,
    encoded_pool,
    shape_weights,
    tokenize,
)
from serve_app.training.evaluate import contact_sheet, measure, misses, quality_grid
from serve_app.training.models import (
    IMAGE_SIZE,
    VAE_FACTOR,
    new_text_encoder,
    new_unet,
    train_scheduler,
)
from serve_app.training.parallel import stream
from serve_app.training.pipeline import assemble

CAPTION_DROPOUT = 0.1
SHAPE_BOOST = 4.0
# Where the layout is decided: from here to the last timestep (zero SNR) the shape cannot
# be seen in the noisy latents (see `train_layout`).
HIGH_FROM = 900
# Where img2img at low strength and the hires pass start: the last steps, which only
# sharpen what is there.
LOW_BELOW = 300
LAYOUT_SHARE = 1.0
SETTLE_HIGH = 0.5
POLISH_HIGH, POLISH_LOW = 0.25, 0.35
# The corners stage: timesteps below this, the loss weighted this much more where the three
# shapes differ (`train_corners`).
CORNERS_BELOW = 600
CORNERS_BOOST = 16.0


@dataclass
class DenoiserRun:
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    best: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def sample_timesteps(n: int, generator: torch.Generator, high_share: float = 0.0,
                     low_share: float = 0.0, below: int | None = None) -> torch.Tensor:
    """`n` training timesteps, uniform over the schedule (or below `below`) but for the
    first `high_share` of them, drawn from `HIGH_FROM` up, and the last `low_share`, drawn
    below `LOW_BELOW`."""
    total = train_scheduler().config.num_train_timesteps
    t = torch.randint(0, below or total, (n,), generator=generator)
    high, low = round(high_share * n), round(low_share * n)
    if high:
        t[:high] = torch.randint(HIGH_FROM, total, (high,), generator=generator)
    if low:
        t[n - low:] = torch.randint(0, LOW_BELOW, (low,), generator=generator)
    return t


def neighbours_captions(captions: list[str], low: int) -> list[str]:
    """`captions` with the last `low` (the samples `sample_timesteps` draws below
    `LOW_BELOW`) each given the next one's caption, the last the first's: where the picture
    is plain to see it should win over the words (see `train_polish`)."""
    if low < 2:
        return captions
    head, tail = captions[:len(captions) - low], captions[len(captions) - low:]
    return head + tail[1:] + tail[:1]


def velocity_loss(unet: UNet2DConditionModel, latents: torch.Tensor, states: torch.Tensor,
                  generator: torch.Generator, extra: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, high_share: float = 0.0,
                  low_share: float = 0.0, below: int | None = None) -> torch.Tensor:
    """The v-prediction MSE of `unet` on `latents` at random timesteps: uniform, except that
    a fraction `high_share` of the batch is drawn from the top of the schedule
    (`HIGH_FROM` and up, see `train_layout`). `extra` (inpainting: mask and masked-image
    latents) is concatenated to the noisy latents; `weights` (B, 1, h, w) weight the squared
    error per latent pixel."""
    scheduler = train_scheduler()
    noise = torch.randn(latents.shape, generator=generator)
    t = sample_timesteps(latents.shape[0], generator, high_share, low_share, below)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    model_input = noisy if extra is None else torch.cat([noisy, extra], dim=1)
    prediction = unet(model_input, t, states).sample
    error = (prediction - target).pow(2)
    return (error if weights is None else error * weights).mean()


def train_denoiser(vae: AutoencoderKL, tokenizer: CLIPTokenizer, steps: int, batch: int = 64,
                   lr: float = 5e-4, pool: int = 20000, seed: int = 0, eval_every: int = 1000,
                   eval_n: int = 45, log_path: Path | None = None,
                   ema_decay: float = 0.999, sheet_dir: Path | None = None,
                   init: tuple[CLIPTextModel, UNet2DConditionModel] | None = None,
                   high_share: float = 0.0, low_share: float = 0.0,
                   stage: str = "denoiser", decay_lr: bool = True,
                   pool_seed: int | None = None, below: int | None = None,
                   corners: float = 0.0) -> DenoiserRun:
    """`pool_seed` (default `seed`) draws the pool of scenes; the stages that continue this
    one pass the run's seed, so they share its encoded pool (`data.encoded_pool`).
    `below` bounds the timesteps, `corners` weights where the shapes differ
    (`train_corners`)."""
    rng = np.random.default_rng(stream(seed + 1000))  # captions (the pool: `pool_seed`)
    generator = torch.Generator().manual_seed(stream(seed))
    progress = Progress(stage, steps, log_path)
    cache = encoded_pool(vae, pool, stream(seed if pool_seed is None else pool_seed),
                         IMAGE_SIZE)
    progress.log(f"pool of {len(cache)} encoded scenes; latent std "
                 f"{float(cache.mean.std()):.3f}")
    text_encoder, unet = init or (new_text_encoder(tokenizer), new_unet())
    text_encoder, unet = text_encoder.train(), unet.train()
    modules = torch.nn.ModuleList([text_encoder, unet])
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.01)
    ema = Ema(modules, ema_decay)
    grid = quality_grid(eval_n, seed=seed + 99)
    run = DenoiserRun(text_encoder, unet)
    best_state = None
    warmup = min(300, steps // 10 + 1)
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr, warmup, decay=decay_lr))
        index = torch.randint(0, len(cache), (batch,), generator=generator)
        latents = cache.sample(index, generator)
        batch_scenes = [cache.scenes[i] for i in index.tolist()]
        captions = captions_for(batch_scenes, rng, CAPTION_DROPOUT)
        captions = neighbours_captions(captions, round(low_share * batch))
        states = text_encoder(tokenize(tokenizer, captions))[0]
        weights = shape_weights(batch_scenes, IMAGE_SIZE, VAE_FACTOR, SHAPE_BOOST, corners)
        loss = velocity_loss(unet, latents, states, generator, weights=weights,
                             high_share=high_share, low_share=low_share, below=below)
        descend(optimizer, loss, modules.parameters(), ema)
        progress.step(loss=loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            scores = evaluate_ema(ema, modules, vae, tokenizer, grid, seed,
                                  sheet_dir / f"eval-{step + 1}.png" if sheet_dir else None)
            mean = float(np.mean(list(scores.values())))
            run.history.append({"step": step + 1, "loss": loss.item(), "mean": mean, **scores})
            progress.log(f"loss {loss.item():.4f} grid {scores} mean {mean:.3f}")
            if mean >= run.best.get("mean", -1.0):
                run.best = run.history[-1]
                best_state = [t.clone() for t in ema.shadow]
    progress.log(f"best at step {run.best.get('step')}: {run.best}")
    progress.close()
    if best_state is not None:
        ema.shadow = best_state
    ema.copy_to(modules)
    return run


def train_layout(vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 unet: UNet2DConditionModel, steps: int, batch: int = 32, lr: float = 2e-4,
                 pool: int = 20000, seed: int = 0, eval_every: int = 500, eval_n: int = 45,
                 log_path: Path | None = None) -> DenoiserRun:
    """Stage 2b: the denoiser's training continued at the top of the schedule only
    (t >= `HIGH_FROM`), at a constant learning rate.

    Why: what is drawn where is decided in the first sampling steps, from pure noise. There
    the model predicts the mean picture of the caption, and "on the left" moves that mean's
    blob; at every lower timestep the noisy latents show where the shape is, so uniform
    timesteps leave position words almost nothing to learn from. After the denoiser stage
    the t=999 prediction was the same centred blur for every position word and the grid's
    positions at chance (24 %); after this stage each word moves it to its anchor and the
    grid's positions reach 64 % (45 prompts), while the colours, trained nowhere here, slip
    (background 96 -> 71 %): `train_settle` brings them back."""
    return train_denoiser(vae, tokenizer, steps, batch=batch, lr=lr, pool=pool,
                          seed=seed + 1, pool_seed=seed, eval_every=eval_every, eval_n=eval_n,
                          log_path=log_path, init=(text_encoder, unet),
                          high_share=LAYOUT_SHARE, stage="layout", ema_decay=0.99,
                          decay_lr=False)


def train_settle(vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 unet: UNet2DConditionModel, steps: int, batch: int = 64, lr: float = 1e-4,
                 pool: int = 20000, seed: int = 0, eval_every: int = 500, eval_n: int = 45,
                 log_path: Path | None = None) -> DenoiserRun:
    """Stage 2c: after `train_layout`, every timestep again, with half of each batch still
    at the top (`SETTLE_HIGH`), so the colours and sizes come back without the positions
    being forgotten; cosine learning rate, EMA.

    Measured (45 prompts): after the layout stage background 71 %, colour 49 %, position
    64 %; after this one 100 / 82 / 100 %, sizes 76 %."""
    return train_denoiser(vae, tokenizer, steps, batch=batch, lr=lr, pool=pool,
                          seed=seed + 2, pool_seed=seed, eval_every=eval_every, eval_n=eval_n,
                          log_path=log_path, init=(text_encoder, unet),
                          high_share=SETTLE_HIGH, stage="settle", ema_decay=0.995)


def train_polish(vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 unet: UNet2DConditionModel, steps: int, batch: int = 48, lr: float = 1e-4,
                 pool: int = 20000, seed: int = 0, eval_every: int = 600, eval_n: int = 45,
                 log_path: Path | None = None) -> DenoiserRun:
    """Stage 2d: after `train_settle`, a quarter of each batch at the top (`POLISH_HIGH`)
    and a third below `LOW_BELOW` (`POLISH_LOW`) with its neighbours' captions.

    Why: img2img at low strength and the hires pass run only the last steps, from a picture
    that is not the caption's. After `train_settle` the model had never been trained on
    that conflict and followed the words: at strength 0.2 the input's blue background turned
    purple (asked: yellow) inside a dark border, with stray pixels, where the denoiser-only
    model kept it. The same shares with the true captions removed the stray pixels but not
    the recolouring; captioning the low-noise samples with other scenes' captions teaches
    that there the picture wins: the input is then kept up to strength 0.3, and the
    180-prompt grid is the same either way (at guidance 5: colour 83.3 / 82.8 %, position
    99.4 %)."""
    return train_denoiser(vae, tokenizer, steps, batch=batch, lr=lr, pool=pool,
                          seed=seed + 3, pool_seed=seed, eval_every=eval_every, eval_n=eval_n,
                          log_path=log_path, init=(text_encoder, unet),
                          high_share=POLISH_HIGH, low_share=POLISH_LOW, stage="polish",
                          ema_decay=0.995)


def train_corners(vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                  unet: UNet2DConditionModel, steps: int, batch: int = 48, lr: float = 1e-4,
                  pool: int = 20000, seed: int = 0, eval_every: int = 500, eval_n: int = 45,
                  log_path: Path | None = None) -> DenoiserRun:
    """Stage 2f: after `contrast.train_contrast`, the timesteps below `CORNERS_BELOW` only,
    with the loss weighted `CORNERS_BOOST` times more where a circle, a square and a
    triangle in the shape's box differ (`data.shape_disagreement`).

    Why: after the contrast stage the model drew circles and large triangles but rounded
    every square (median fill 0.80 small, 0.84 medium; the judge's cut is 0.89: squares
    11 of 60 on the 180-prompt grid) and no sampler changed it. img2img of a rendered
    square at strength 0.4, caption and picture both saying square, rounded its corners
    too (fill 0.88): the corners are lost in the middle of the schedule, where the picture
    is already laid out, not for want of the word. There a square's corners are 4 of the
    ~250 latent pixels (1/60 of a batch's loss even with the box weighted), and the
    model's best guess under the noise is the rounder average. In the shapes-6 run (1,000
    steps, then the decoder stage rerun): shape 62.8 -> 76.7 % on the 180-prompt grid
    (squares 11 -> 26 of 60, small triangles 6 -> 14 of 20), colour 100 %, size 93.9 %;
    600 more contrast steps instead: 60.0 %. Variants, each through this stage from the
    same folder (`bench/results/2026-12-07-corners-variants.json`): the corner weight
    added after normalising the box weights (a one-seed trial of it had scored 80.6 %)
    77.2 %, and 74.4 % at 2,000 steps: the squares it misses stay just under the judge's
    cut. The cost: img2img at strength 0.2-0.3 keeps the input's background and place but
    shifts its shape's colour one step towards a prompt that asks for another (these
    timesteps are trained with true captions). A quarter of each batch at t < 300 with
    other scenes' captions, as `train_polish` does, keeps the colour but cost size
    (93.9 -> 86.7 %)."""
    return train_denoiser(vae, tokenizer, steps, batch=batch, lr=lr, pool=pool,
                          seed=seed + 6, pool_seed=seed, eval_every=eval_every, eval_n=eval_n,
                          log_path=log_path, init=(text_encoder, unet), stage="corners",
                          ema_decay=0.99, below=CORNERS_BELOW, corners=CORNERS_BOOST)


def evaluate_ema(ema: Ema, modules: torch.nn.ModuleList, vae: AutoencoderKL,
                 tokenizer: CLIPTokenizer, grid: list, seed: int,
                 sheet: Path | None = None) -> dict[str, float]:
    """The judge's figures of the EMA weights on `grid` (and its contact sheet, if asked)."""
    frozen = copy.deepcopy(modules)
    ema.copy_to(frozen)
    text_encoder, unet = frozen[0], frozen[1]
    pipe = assemble(vae, text_encoder, tokenizer, unet)
    scores, images, verdicts = measure(pipe, grid, seed=seed)
    if sheet is not None:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(images, [p for p, _ in grid],
                      [" ".join(misses(v, t)) for v, (_, t) in zip(verdicts, grid, strict=True)]
                      ).save(sheet)
    return {k: round(v, 3) for k, v in scores.items()}
