"""Quality benchmark of a trained shapes-world model: does it draw what it is asked?

    python -m bench.quality --model DIR [--n 180] [--repeats 5] [--steps N] [--guidance G]
        [--sampler NAME] [--size PX] [--inpaint DIR] [--lora DIR] [--controlnet DIR]
        [--out DIR]

Generates the quality grid (`serve_app.training.evaluate.quality_grid`: prompts naming
every attribute, balanced over the vocabulary) at the model's default size, steps, sampler
and guidance (those it was tuned for, unless overridden), judges every image by pixel
analysis (`serve_app.training.judge`: background from the border, shape colour from the
non-background pixels, position from the centroid, size from the bounding box's area,
shape from the fill ratio of the bounding box) and reports the fraction correct per
attribute against the issue's targets. The grid is drawn `--repeats` times, each time with
other seeds (repeat r draws prompt i with seed `--seed` + r * n + i), and the figures are
over all of them: one draw of 180 is noisy (`shapes-6`'s shape figure read 76.7, 80.6,
83.3, 78.3 and 81.7 % on the five), five together are within about 1.5 points.
The report keeps each repeat's figures. Also: the median time of one batch-1 job at those
settings, and, when given, the companions' checks (`serve_app.training.checks`).

Writes `quality-<model>.json` (figures, settings, per-image verdicts) and
`quality-<model>.png` (the contact sheet: each image with its prompt, misses in red) to
`--out` (default `bench/results`). Progress goes to stderr, the JSON summary to stdout.
The contact sheet shows the first repeat. Runs on the CPU with 2 threads; about two
minutes for the default grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TARGETS = {"background": 0.95, "colour": 0.90, "position": 0.90, "shape": 0.80, "size": 0.85}


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads (see serve_app.training.__main__): no spinning OpenMP threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from diffusers import ControlNetModel, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from serve_app.training import checks
    from serve_app.training.evaluate import (
        DEFAULTS,
        contact_sheet,
        measure,
        misses,
        quality_grid,
        time_one,
    )
    from serve_app.training.judge import score

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="text-to-image folder")
    parser.add_argument("--n", type=int, default=180, help="grid size")
    parser.add_argument("--repeats", type=int, default=5,
                        help="draws of the grid, each with other seeds")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    parser.add_argument("--sampler", default=DEFAULTS["sampler"])
    parser.add_argument("--size", type=int, default=DEFAULTS["width"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inpaint", type=Path, help="inpainting pipeline folder")
    parser.add_argument("--lora", type=Path, help="folder of the style LoRA")
    parser.add_argument("--controlnet", type=Path, help="canny ControlNet folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = {"steps": args.steps, "guidance_scale": args.guidance,
                "sampler": args.sampler, "size": args.size}
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    one_grid = quality_grid(args.n)
    log(f"{args.model}: {len(one_grid)} prompts x {args.repeats} seeds, {settings}")
    start = time.perf_counter()
    grid = one_grid * args.repeats
    images, verdicts, per_repeat = [], [], []
    for r in range(args.repeats):
        scores, drawn, judged = measure(pipe, one_grid, seed=args.seed + r * len(one_grid),
                                        **settings)
        per_repeat.append({k: round(v, 4) for k, v in scores.items()})
        images += drawn
        verdicts += judged
        log(f"repeat {r + 1}/{args.repeats}: {per_repeat[-1]}")
    scores = score(verdicts, [t for _, t in grid])
    grid_s = time.perf_counter() - start
    one_job_s = time_one(pipe, **settings)
    report: dict = {
        "model": str(args.model), "settings": settings, "n": len(grid),
        "repeats": args.repeats, "seeds": [args.seed, args.seed + len(grid) - 1],
        "figures": {k: round(v, 4) for k, v in scores.items()},
        "per_repeat": per_repeat,
        "targets": TARGETS,
        "met": {k: scores.get(k, 0.0) >= v for k, v in TARGETS.items()},
        "one_job_s": round(one_job_s, 3), "grid_s": round(grid_s, 1),
        "images": [{"prompt": p, "truth": t, "judged": v.attributes(), "fill": v.fill,
                    "half_side": v.half_side, "centroid": v.centroid}
                   for (p, t), v in zip(grid, verdicts, strict=True)],
    }
    log(f"figures {report['figures']}; one job {one_job_s:.3f} s")
    marks = [" ".join(misses(v, t)) for v, (_, t) in zip(verdicts, grid, strict=True)]
    name = args.model.resolve().name
    args.out.mkdir(parents=True, exist_ok=True)
    sheet = args.out / f"quality-{name}.png"
    first = len(one_grid)
    contact_sheet(images[:first], [p for p, _ in one_grid], marks[:first]).save(sheet)
    report["contact_sheet"] = str(sheet)

    companions: dict = {}
    if args.inpaint:
        inpaint = StableDiffusionInpaintPipeline.from_pretrained(args.inpaint,
                                                                 torch_dtype=torch.float32)
        figures, outs, prompts = checks.measure_inpaint(inpaint, **settings)
        companions["inpaint"] = figures
        contact_sheet(outs, prompts).save(args.out / f"quality-{name}-inpaint.png")
        log(f"inpaint {figures}")
    if args.lora:
        figures, outs = checks.measure_lora(pipe, args.lora, one_grid[:40], **settings)
        companions["lora"] = figures
        labels = ([f"scale 0: {p}" for p, _ in one_grid[:40]]
                  + [f"scale 1: {p}" for p, _ in one_grid[:40]])
        contact_sheet(outs, labels).save(args.out / f"quality-{name}-lora.png")
        log(f"lora {figures}")
    if args.controlnet:
        net = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=torch.float32)
        figures, outs, controls = checks.measure_controlnet(pipe, net, **settings)
        companions["controlnet"] = figures
        pairs = [im for pair in zip(controls[:30], outs[:30], strict=True) for im in pair]
        contact_sheet(pairs, ["control", "generated"] * 30).save(
            args.out / f"quality-{name}-controlnet.png")
        log(f"controlnet {figures}")
    if companions:
        report["companions"] = companions
    path = args.out / f"quality-{name}.json"
    path.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k != "images"}
    print(json.dumps(summary, indent=2))
    return 0 if all(report["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
