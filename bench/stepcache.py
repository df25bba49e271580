"""Step caching on these CPUs: its speed and what it costs in quality, in one run.

    .venv/bin/python -m bench.stepcache [--model tiny-sd] [--every 3] [--n 180] [--rounds 5]

The model as its registry entry ships (default: the registry's default model, the trained
shapes model), through the replica's own code (`ModelRunner`), at its default size, steps,
sampler and guidance, with `runtime.step_cache: {kind: deepcache, every: N}` against the
same model without. Speed: one batch-1 job at a time, the two alternating, the median of
`--rounds` each (warm-ups not counted); the figure is uncached ÷ cached seconds. Quality:
the shapes world's quality grid (`serve_app.training.evaluate.quality_grid`: prompts over
every attribute, judged by pixel analysis in `serve_app.training.judge`; 180 prompts, as
`bench.quality` and issue 25 measure, since one image is 1.1 points of a 90-prompt grid),
the same prompts and seeds with and without the cache; issue 26's bar is the cached
figures within 5 points of the uncached ones. Writes `bench/results/<date>-stepcache-<model>.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import datetime
import io
import json
import statistics
import time
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def runner(model_id: str, every: int | None) -> Any:
    from serve_app.generation.runner import ModelRunner
    from serve_app.model_runtime import StepCacheSpec
    from serve_app.registry import load_registry
    from serve_app.settings import load_settings

    settings = load_settings()
    spec = load_registry(ROOT / "config" / "models.yaml").get(model_id)
    if spec is None:
        raise SystemExit(f"no model {model_id!r} in config/models.yaml")
    if every is not None:
        cache = StepCacheSpec(kind="deepcache", every=every)
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(
            update={"step_cache": cache})})
    return ModelRunner(spec, settings)


def task(r: Any, prompt: str, seed: int, job: str = "bench") -> Any:
    from serve_app.messages import GenerationTask, JobType

    d = r.spec.defaults
    return GenerationTask(job_id=job, mode=JobType.TEXT2IMG, prompt=prompt,
                          negative_prompt="", width=d.width, height=d.height, steps=d.steps,
                          guidance_scale=d.guidance_scale, seed=seed, sampler=d.sampler)


def quality(r: Any, grid: list[tuple[str, dict[str, str]]]) -> dict[str, float]:
    from PIL import Image

    from serve_app.training import judge

    verdicts = []
    for i in range(0, len(grid), 8):  # batches of 8, as the tracker would send them
        chunk = grid[i:i + 8]
        results = r.generate_batch([task(r, p, 100 + i + j, f"q{i + j}")
                                    for j, (p, _) in enumerate(chunk)])
        verdicts += [judge.judge(Image.open(io.BytesIO(res.images[0])).convert("RGB"))
                     for res in results]
    return {k: round(v, 4) for k, v in judge.score(verdicts, [t for _, t in grid]).items()}


def main(argv: list[str] | None = None) -> int:
    from serve_app.registry import load_registry
    from serve_app.settings import load_settings
    from serve_app.training.evaluate import quality_grid

    parser = argparse.ArgumentParser(prog="bench.stepcache", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=load_settings().default_model)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--n", type=int, default=180)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    opts = parser.parse_args(argv)
    assert load_registry(ROOT / "config" / "models.yaml").get(opts.model) is not None

    plain, cached = runner(opts.model, None), runner(opts.model, opts.every)
    one = "a red circle on a blue background"
    for r in (plain, cached):
        r.generate(task(r, one, 0))  # warm-up
    times: dict[str, list[float]] = {"plain": [], "cached": []}
    for i in range(opts.rounds):
        for name, r in (("plain", plain), ("cached", cached)):
            began = time.perf_counter()
            r.generate(task(r, one, i + 1))
            times[name].append(time.perf_counter() - began)
    grid = quality_grid(opts.n)
    q_plain, q_cached = quality(plain, grid), quality(cached, grid)
    med = {k: statistics.median(v) for k, v in times.items()}
    worst = max(q_plain[k] - q_cached[k] for k in q_plain)
    d = plain.spec.defaults
    report = {
        "date": datetime.date.today().isoformat(), "model": opts.model,
        "settings": {"size": d.width, "steps": d.steps, "sampler": d.sampler,
                     "guidance": d.guidance_scale, "step_cache": f"deepcache every {opts.every}",
                     "grid": len(grid)},
        "speed_ratio": round(med["plain"] / med["cached"], 3),
        "one_job_s": {k: round(v, 4) for k, v in med.items()},
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "quality_plain": q_plain, "quality_cached": q_cached,
        "worst_drop_points": round(100 * worst, 1),
        "within_5_points": worst <= 0.05,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"{report['date']}-stepcache-{opts.model}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
