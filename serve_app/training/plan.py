"""What a training run does and how long it takes: the steps, batches and pools of every
stage (`Plan`, and `SMOKE`, CI's few steps of each), and each stage's measured seconds per
step for the time estimate. A module of its own so that the run's worker processes
(`parallel.launch`) can unpickle it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Steps per stage: the longer plan (`shapes-10`, 2026-12-07,
    `bench/results/2026-12-07-train-shapes-10.json`). The shorter one before it (layout
    1,000, settle 800, decoder 1,500, LoRA and ControlNet 400 each: `shapes-9`, 84.3 min)
    drew 3.5 points fewer shapes, 1.8 fewer colours and 2.8 fewer sizes over 900 images;
    these steps cost ~15 min more. `SECONDS_PER_STEP` below is each stage's wall time per
    step in the `shapes-8` run from scratch (two workers on a 2-core machine; its
    evaluations, encodes and checks included), for the time estimate printed before and
    during the run: ~116 min in all on that VM, the slowest measured (`shapes-10` took
    ~107 on another). The decoder's is from its stage run alone since it draws half its
    pool from scratch (`decoder.DRAWN_SHARE`). The run's ETA scales to the machine as
    stages finish."""

    vae: int = 3000
    denoiser: int = 2500
    layout: int = 1500
    settle: int = 1000
    polish: int = 600
    contrast: int = 600
    corners: int = 1000
    decoder: int = 2500
    inpaint: int = 300
    lora: int = 600
    controlnet: int = 600
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
