"""The prepared GPU check (issue 26): one command, on one GPU machine, no downloads:

    python -m bench.gpucheck                 # CUDA: the whole matrix, ~6-8 min on an H100
    python -m bench.gpucheck --dry-run       # the same code on a CPU with the tiny models

It builds full-size SD 1.5, SDXL and FLUX.1 architectures with random weights
(bench/architectures.py: the real FLOPs and memory) and runs them through the replica's own
code (`ModelRunner`, the registry's `runtime` knobs applied by the replica's loader):

- SD 1.5, 512², 50 steps, fp16: batch 1, 2, 4 and 8 as shipped (`batch_invariant: auto`,
  off on a GPU: one forward per step), batch 8 with invariance on (per-image forwards); how
  far a batched image is from the same seed alone in each; host syncs per denoising step
  (`torch.cuda.set_sync_debug_mode`, the steps of a 20-step call less a 10-step one);
  DeepCache (`step_cache`) on at batch 1 and 8; `torch.compile` on, then a second process
  that loads the saved artifacts (`CompileCache`) and times its first call.
- SDXL, 1024², 30 steps, fp16: batch 1 and 4.
- FLUX.1, 1024², 28 steps, bf16: batch 1 plain, with TaylorSeer, and with fp8 weights plus
  TaylorSeer (compute capability 8.9+).
- One job end to end through Ray Serve on the GPU (the random SD 1.5 saved as a checkpoint,
  `device: auto` placed on the GPU), when `ray` imports here.

Each case stops the matrix when the time budget (`--budget-s`) is spent and says what was
skipped. Results: one JSON and a Markdown table under `--out` (default bench/results/). On
a machine without CUDA (and without --dry-run) it says so, writes the JSON and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpucheck.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import datetime
import gc
import json
import subprocess
import tempfile
import time
import traceback
import warnings
from typing import Any

from bench.gpucheck_serve import serve_one_job

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"
# Issue 26's targets on an H100 (seconds per image at batch 1, and a throughput ratio).
TARGETS = {"sd15_b1_s": 0.6, "sdxl_b1_s": 2.5, "flux_b1_speedups_s": 3.2,
           "sd15_b8_throughput_x": 1.8}


class Check:
    """The run's options, scratch folder, clock and rows."""

    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        import torch

        self.opts, self.workdir = opts, workdir
        self.dry = opts.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.began = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.torch = torch

    def left_s(self) -> float:
        return self.opts.budget_s - (time.perf_counter() - self.began)

    def size(self, full: int) -> int:
        return 64 if self.dry else full

    def steps(self, full: int) -> int:
        return 2 if self.dry else full

    def runner(self, family: str, model_id: str, dtype: str, **runtime: Any) -> Any:
        from serve_app.generation.runner import ModelRunner
        from serve_app.registry import ModelSpec
        from serve_app.settings import load_settings

        spec = ModelSpec.model_validate({
            "id": model_id, "name": model_id, "description": "random weights",
            "pipeline": family, "path": str(self.workdir / "unused"),
            "runtime": {"device": self.device, "dtype": dtype, **runtime},
            "scaling": {"max_batch_size": 8},
        })
        settings = load_settings({"store": "memory", "cache_dir": str(self.workdir / "cache"),
                                  "data_dir": str(self.workdir / "data"),
                                  "model_path": str(self.workdir)})
        return ModelRunner(spec, settings, device=self.device, loader=self._loader(family))

    def _loader(self, family: str) -> Any:
        def load(spec: Any, settings: Any, device: str, dtype: Any) -> Any:
            from bench.architectures import build
            from serve_app.generation.pipelines import apply_runtime

            pipe = build(family, self.workdir, device, dtype, dry=self.dry)
            apply_runtime(pipe, spec.runtime, device)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        return load

    def tasks(self, n: int, size: int, steps: int, guidance: float = 7.5) -> list[Any]:
        from serve_app.messages import GenerationTask, JobType

        return [GenerationTask(job_id=f"gpu-{i}", mode=JobType.TEXT2IMG, prompt=f"{PROMPT} {i}",
                               negative_prompt="", width=size, height=size, steps=steps,
                               guidance_scale=guidance, seed=1000 + i, sampler="euler")
                for i in range(n)]

    def timed(self, runner: Any, batch: list[Any]) -> tuple[float, list[Any]]:
        self.sync()
        began = time.perf_counter()
        results = runner.generate_batch(batch) if len(batch) > 1 else [runner.generate(batch[0])]
        self.sync()
        return time.perf_counter() - began, results

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def row(self, case: str, runner: Any, batch: list[Any], repeats: int = 2,
            **extra: Any) -> dict[str, Any]:
        first, _ = self.timed(runner, batch)  # warm-up (and compile)
        best = min(self.timed(runner, batch)[0] for _ in range(1 if self.dry else repeats))
        n = len(batch)
        row = {"case": case, "batch": n, "size": batch[0].width, "steps": batch[0].steps,
               "first_call_s": round(first, 3), "s_per_call": round(best, 4),
               "s_per_image": round(best / n, 4), "images_per_s": round(n / best, 3), **extra}
        if self.device == "cuda":
            row["max_memory_gib"] = round(self.torch.cuda.max_memory_allocated() / 2**30, 2)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def free(self, *runners: Any) -> None:
        for runner in runners:
            runner.close()
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()


# -- the cases -----------------------------------------------------------------------------


def sd15(check: Check) -> None:
    size, steps = check.size(512), check.steps(50)
    shipped = check.runner("sd", "sd15", "float16")
    for n in (1, 2, 4, 8):
        check.row("sd15", shipped, check.tasks(n, size, steps), invariance="auto (off)")
    check.rows.append({"case": "sd15-batched-vs-alone", **_batched_vs_alone(check, shipped)})
    check.rows.append({"case": "sd15-host-syncs", **_syncs_per_step(check, shipped, size)})
    check.free(shipped)
    invariant = check.runner("sd", "sd15", "float16", batch_invariant=True)
    check.row("sd15", invariant, check.tasks(8, size, steps), invariance="on")
    check.rows.append({"case": "sd15-batched-vs-alone-invariant",
                       **_batched_vs_alone(check, invariant)})
    check.free(invariant)
    cached = check.runner("sd", "sd15", "float16",
                          step_cache={"kind": "deepcache", "every": 3})
    for n in (1, 8):
        check.row("sd15", cached, check.tasks(n, size, steps), step_cache="deepcache/3")
    check.free(cached)


def sd15_compile(check: Check) -> None:
    if check.dry:
        check.notes.append("sd15-compile: torch.compile is a CUDA knob; not run dry")
        return
    size, steps = check.size(512), check.steps(50)
    compiled = check.runner("sd", "sd15", "float16", compile=True)
    for n in (1, 8):
        check.row("sd15", compiled, check.tasks(n, size, steps), compile="on")
    check.free(compiled)
    # A fresh process, as a replica scaled up from zero: artifacts loaded, first call timed.
    out = subprocess.run([sys.executable, "-m", "bench.gpucheck", "--reuse-compile",
                          str(check.workdir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=max(60, int(check.left_s())))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    check.rows.append({"case": "sd15-compile-reused", **(json.loads(lines[-1]) if lines
                                                          else {"error": out.stderr[-2000:]})})


def reuse_compile(workdir: Path) -> int:
    """The second process of sd15_compile."""
    opts = argparse.Namespace(dry_run=False, budget_s=600)
    check = Check(opts, workdir)
    began = time.perf_counter()
    runner = check.runner("sd", "sd15", "float16", compile=True)
    load_s = time.perf_counter() - began
    first, _ = check.timed(runner, check.tasks(1, 512, 50))
    print(json.dumps({"artifacts_loaded": bool(runner._compile_cache and
                                               runner._compile_cache.loaded),
                      "build_s": round(load_s, 2), "first_call_s": round(first, 3)}))
    return 0


def sdxl(check: Check) -> None:
    runner = check.runner("sdxl", "sdxl", "float16")
    for n in (1, 4):
        check.row("sdxl", runner, check.tasks(n, check.size(1024), check.steps(30), 5.0))
    check.free(runner)


def flux(check: Check) -> None:
    size, steps = check.size(1024), check.steps(28)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("plain", {}), ("taylorseer/3", {"step_cache": {"kind": "taylorseer", "every": 3}})]
    if not check.dry and check.torch.cuda.get_device_capability() >= (8, 9):
        variants.append(("fp8 + taylorseer/3", {
            "quantize": "fp8", "step_cache": {"kind": "taylorseer", "every": 3}}))
    for label, runtime in variants:
        if check.left_s() < 60:
            check.notes.append(f"flux {label}: skipped, out of time")
            continue
        runner = check.runner("flux", "flux", "bfloat16", **runtime)
        check.row("flux", runner, check.tasks(1, size, steps, 3.5), speedups=label)
        check.free(runner)


def serve(check: Check) -> None:
    check.rows.append({"case": "serve-e2e", **serve_one_job(check)})


CASES = {"sd15": sd15, "sd15-compile": sd15_compile, "sdxl": sdxl, "flux": flux,
         "serve": serve}


def _batched_vs_alone(check: Check, runner: Any) -> dict[str, Any]:
    """How far image 0 of a batch of 4 is from the same seed made alone (8-bit pixels)."""
    import numpy as np
    from PIL import Image

    batch = check.tasks(4, check.size(512), check.steps(20))
    together = runner.generate_batch(batch)[0].images[0]
    alone = runner.generate(batch[0]).images[0]

    def pixels(data: bytes) -> Any:
        import io

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    diff = np.abs(pixels(together) - pixels(alone))
    return {"identical": together == alone, "max_pixel_diff": int(diff.max()),
            "mean_pixel_diff": round(float(diff.mean()), 4),
            "pixels_differing": round(float((diff > 0).mean()), 4)}


def _syncs_per_step(check: Check, runner: Any, size: int) -> dict[str, Any]:
    """Synchronizing CUDA calls per denoising step: a 20-step call's less a 10-step one's,
    over the 10 steps between (torch warns on each with sync debug mode 1)."""
    if check.device != "cuda":
        return {"skipped": "needs CUDA"}
    counts = []
    for steps in (10, 20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check.torch.cuda.set_sync_debug_mode(1)
            try:
                runner.generate_batch(check.tasks(4, size, steps))
            finally:
                check.torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return {"syncs_10_steps": counts[0], "syncs_20_steps": counts[1],
            "syncs_per_step": (counts[1] - counts[0]) / 10}


# -- the report ----------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def at(case: str, batch: int, **match: Any) -> float | None:
        for r in rows:
            if r.get("case") == case and r.get("batch") == batch and all(
                    r.get(k) == v for k, v in match.items()):
                return float(r["s_per_image"])
        return None

    sd_b1, sd_b8 = at("sd15", 1, invariance="auto (off)"), at("sd15", 8,
                                                             invariance="auto (off)")
    flux_fast = [float(r["s_per_image"]) for r in rows
                 if r.get("case") == "flux" and r.get("speedups") != "plain"]
    return {
        "sd15_b1_s": sd_b1, "sdxl_b1_s": at("sdxl", 1),
        "flux_b1_plain_s": at("flux", 1, speedups="plain"),
        "flux_b1_speedups_s": min(flux_fast) if flux_fast else None,
        "sd15_b8_throughput_x": round(sd_b1 / sd_b8, 3) if sd_b1 and sd_b8 else None,
        "targets": TARGETS,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check, {report['device']}, {report['date']}", "",
             f"torch {report['torch']}; dry run: {report['dry_run']}", "",
             "| case | batch | size | steps | variant | s/image | images/s | first call s | "
             "GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "s_per_image" not in r:
            continue
        variant = r.get("invariance") or r.get("step_cache") or r.get("compile") or r.get(
            "speedups") or ""
        lines.append(f"| {r['case']} | {r['batch']} | {r['size']} | {r['steps']} | "
                     f"{variant} | {r['s_per_image']} | {r['images_per_s']} | "
                     f"{r['first_call_s']} | {r.get('max_memory_gib', '')} |")
    lines += ["", "Other rows:", ""]
    lines += [f"- `{json.dumps(r)}`" for r in report["rows"] if "s_per_image" not in r]
    lines += ["", f"Against the targets: `{json.dumps(report['summary'])}`", ""]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny models on a CPU: the same code, seconds, no GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--only", action="append", choices=list(CASES))
    parser.add_argument("--reuse-compile", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.reuse_compile:
        return reuse_compile(opts.reuse_compile)
    import torch

    date = datetime.date.today().isoformat()
    stem = opts.out / f"{date}-gpucheck{'-dry' if opts.dry_run else ''}"
    opts.out.mkdir(parents=True, exist_ok=True)
    if not opts.dry_run and not torch.cuda.is_available():
        message = ("No CUDA device here: the GPU check measures GPUs. Nothing was measured; "
                   "`python -m bench.gpucheck --dry-run` runs the same code on a CPU.")
        print(message, file=sys.stderr)
        report: dict[str, Any] = {"skipped": message, "torch": torch.__version__, "date": date}
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
        return 0
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="imagegen-gpucheck-") as tmp:
        check = Check(opts, Path(tmp))
        for name in opts.only or list(CASES):
            if check.left_s() < 30:
                check.notes.append(f"{name}: skipped, out of time")
                continue
            began = time.perf_counter()
            try:
                CASES[name](check)
            except Exception as exc:  # one case failing must not lose the others' figures
                check.rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}",
                                   "trace": traceback.format_exc()[-3000:]})
                check.free()
            check.notes.append(f"{name}: {time.perf_counter() - began:.0f} s")
        report = {
            "device": "cpu (dry run)" if opts.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "date": date, "dry_run": opts.dry_run,
            "budget_s": opts.budget_s, "rows": check.rows, "notes": check.notes,
            "summary": summarize(check.rows),
        }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
