"""`python -m serve_app.training --out DIR [--smoke] [--seed N] [--stages ...] [--resume]`:
retrain every trained tiny model from scratch, seeded, on the CPU.

Stages, in order (each reads what the ones before it wrote into DIR):
  tokenizer   DIR/tokenizer/              (seconds)
  vae         DIR/vae/                    (AutoencoderKL, f=4)
  denoiser    DIR/tiny-sd/                (the text-to-image pipeline)
  layout      DIR/tiny-sd/ again          (the denoiser continued at the noisiest steps,
                                           where positions are decided; + layout.json)
  settle      DIR/tiny-sd/ again          (then at every step again; + settle.json)
  polish      DIR/tiny-sd/ again          (then the last steps, where the picture wins
                                           over the words: img2img; + polish.json)
  contrast    DIR/tiny-sd/ again          (then each scene as a circle, a square and a
                                           triangle with the same noise: the shape words;
                                           + contrast.json)
  corners     DIR/tiny-sd/ again          (then the middle and last steps, weighted where
                                           the shapes differ: corners; + corners.json)
  decoder     DIR/tiny-sd/vae again       (the VAE's decoder fine-tuned on the
                                           denoiser's latents; + decoder.json)
  inpaint     DIR/tiny-sd-inpaint/        (9-channel UNet, same VAE and text encoder)
  lora        DIR/tiny-outline-lora/pytorch_lora_weights.safetensors
  controlnet  DIR/tiny-canny/             (ControlNetModel)
Then DIR/report.json: wall and CPU seconds per stage, the training figures, and the
quality grid's figures of the final model (what `python -m bench.quality` reports).

`--smoke` runs every stage for a handful of steps on tiny pools (well under a minute in
all; what CI runs). `--resume` keeps stages whose output is already in DIR. Each stage
shows a progress bar with its time estimate, and the whole run's estimate is printed at
the start and after every stage; the log is also appended to DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    """Steps per stage. `SECONDS_PER_STEP` below is each stage's wall time per step in the
    shapes-5 run on a 2-core machine (its evaluations and encodes included; `corners` from
    the shapes-6 run), for the time estimate printed before and during the run: ~131 min
    in all."""

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
SECONDS_PER_STEP = {"vae": 0.17, "denoiser": 0.82, "layout": 0.55, "settle": 0.78,
                    "polish": 0.63, "contrast": 0.82, "corners": 0.72, "decoder": 0.24,
                    "inpaint": 1.5, "lora": 0.87, "controlnet": 0.9}
# What `--stages` may name, in the order they run.
STAGES = ("tokenizer", "vae", "denoiser", "layout", "settle", "polish", "contrast", "corners",
          "decoder", "inpaint", "lora", "controlnet")


def estimate_s(plan: Plan, stages: tuple[str, ...]) -> float:
    return sum(getattr(plan, s) * SECONDS_PER_STEP[s] for s in stages if s in SECONDS_PER_STEP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; valid: {', '.join(STAGES)}")
    # Before torch loads: waiting OpenMP threads sleep instead of spinning. On a shared
    # 2-core machine a niced process's spinning threads stall at every op (generation
    # measured 20x slower under load); on an idle machine this costs ~10 %.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from serve_app.training.run import run

    plan = SMOKE if args.smoke else Plan()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"training {', '.join(stages)} into {args.out} (seed {args.seed}); estimated "
          f"{estimate_s(plan, stages) / 60:.1f} min on an idle 2-core machine",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    report: dict[str, Any] = run(args.out, plan, stages, seed=args.seed, threads=args.threads,
                                 resume=args.resume)
    report["total_wall_s"] = round(time.monotonic() - start, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
