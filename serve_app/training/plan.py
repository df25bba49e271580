"""What a training run does and how long it takes: the steps, batches and pools of every
stage (`Plan`, and `SMOKE`, CI's few steps of each), and each stage's measured seconds per
step for the time estimate. A module of its own so that the run's worker processes
(`parallel.launch`) can unpickle it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Steps per stage. `SECONDS_PER_STEP` below is each stage's wall time per step in the
    `shapes-8` run from scratch (2026-12-07, two workers on a 2-core machine; its
    evaluations, encodes and checks included), for the time estimate printed before and
    during the run: ~100 min in all (`bench/results/2026-12-07-train-shapes-8.json`). The
    decoder's is from its stage run alone since it draws half its pool from scratch
    (`decoder.DRAWN_SHARE`; 6.6 min, 5.7 before). The estimate is the slower of the two VMs
    measured: `shapes-9`, the same plan on another VM of the same kind, took 84.3 min
    (`-shapes-9.json`); the run's ETA scales to the machine as stages finish."""

    vae: int = 3000
    denoiser: int = 2500
    layout: int = 1000
    settle: int = 800
    polish: int = 600
    contrast: int = 600
    corners: int = 1000
    decoder: int = 1500
    inpaint: int = 300
    lora: int = 400
    controlnet: int = 400
    pool: int = 20000
    companion_pool: int = 3000
    eval_every: int = 500
    eval_n: int = 45
    vae_batch: int = 16
    batch: int = 64
    layout_batch: int = 32
    polish_batch: int = 48
    decoder_batch: int = 32
    decoder_pool: int = 2400
    quality_n: int = 180


SMOKE = Plan(vae=3, denoiser=3, layout=2, settle=2, polish=2, contrast=2, corners=2, decoder=2,
             inpaint=2, lora=2, controlnet=2, pool=64, companion_pool=32, eval_every=3,
             eval_n=4, vae_batch=4, batch=4, layout_batch=4, polish_batch=4, decoder_batch=4,
             decoder_pool=8, quality_n=4)
SECONDS_PER_STEP = {"vae": 0.16, "denoiser": 0.72, "layout": 0.51, "settle": 0.71,
                    "polish": 0.54, "contrast": 0.64, "corners": 0.52, "decoder": 0.26,
                    "inpaint": 1.09, "lora": 0.76, "controlnet": 0.87}
# What `--stages` may name, in the order they run.
STAGES = ("tokenizer", "vae", "denoiser", "layout", "settle", "polish", "contrast", "corners",
          "decoder", "inpaint", "lora", "controlnet")


def estimate_s(plan: Plan, stages: tuple[str, ...]) -> float:
    return sum(getattr(plan, s) * SECONDS_PER_STEP[s] for s in stages if s in SECONDS_PER_STEP)
