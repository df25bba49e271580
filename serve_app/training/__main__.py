"""`python -m serve_app.training --out DIR [--smoke] [--seed N] [--stages ...] [--resume]
[--workers N] [--threads N]`: retrain every trained tiny model from scratch, seeded, on the
CPU, in `--workers` data-parallel processes (default 2, one per core of these machines, of
`--threads` torch threads each: 1; see `parallel`). What a run draws depends on its seed
and on its number of workers (each worker draws its own data).

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

`--smoke` runs every stage for a handful of steps on tiny pools (about a minute in all;
what CI runs). `--resume` keeps stages whose output is already in DIR. Each stage
shows a progress bar with its time estimate, and the whole run's estimate is printed at
the start and after every stage; the log is also appended to DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.training.plan import SMOKE, STAGES, Plan, estimate_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2,
                        help="data-parallel processes (default 2: one per core here)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the cores, 2, shared out)")
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
    from serve_app.training import parallel
    from serve_app.training.run import run

    if args.workers < 1:
        parser.error("--workers must be at least 1")
    threads = args.threads or max(1, 2 // args.workers)
    plan = SMOKE if args.smoke else Plan()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"training {', '.join(stages)} into {args.out} (seed {args.seed}, {args.workers} "
          f"workers of {threads} threads); estimated {estimate_s(plan, stages) / 60:.1f} min "
          f"on an idle 2-core machine", file=sys.stderr, flush=True)
    start = time.monotonic()
    report: dict[str, Any] = parallel.launch(run, args.workers, args.out, args.out, plan,
                                             stages, args.seed, threads, args.resume)
    report["total_wall_s"] = round(time.monotonic() - start, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
