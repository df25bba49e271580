"""The retraining run behind `python -m serve_app.training` (see `__main__` for the CLI).

Contract (`run(out, plan, stages, ...)`):
- Runs the named stages in order; each stage loads its inputs from DIR with
  `from_pretrained` (exactly what ships), so stages can be rerun one at a time and a
  `--resume`d run skips stages whose output is already there.
- Returns a report: per stage wall seconds, CPU seconds (so a run slowed by other processes
  on the machine can still be compared to an idle one: CPU s / threads), and its figures;
  at the end the quality grid of the final text-to-image model and the companions' checks.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from serve_app.training import checks, parallel
from serve_app.training.common import setup
from serve_app.training.evaluate import measure, quality_grid
from serve_app.training.tokenizer import build_tokenizer_files, load_tokenizer

FOLDERS = {"tokenizer": "tokenizer", "vae": "vae", "denoiser": "tiny-sd", "layout": "tiny-sd",
           "settle": "tiny-sd", "polish": "tiny-sd", "contrast": "tiny-sd", "corners": "tiny-sd",
           "decoder": "tiny-sd", "inpaint": "tiny-sd-inpaint", "lora": "tiny-outline-lora",
           "controlnet": "tiny-canny"}
MARKERS = {"tokenizer": "vocab.json", "vae": "config.json", "denoiser": "model_index.json",
           "layout": "layout.json", "settle": "settle.json", "polish": "polish.json",
           "contrast": "contrast.json", "corners": "corners.json", "decoder": "decoder.json",
           "inpaint": "model_index.json", "lora": "pytorch_lora_weights.safetensors",
           "controlnet": "config.json"}
# The plan's fields split over the workers (`per_worker`).
SPLIT = ("vae_batch", "batch", "layout_batch", "polish_batch", "decoder_batch", "pool",
         "companion_pool", "decoder_pool")


def run(out: Path, plan: Any, stages: tuple[str, ...], seed: int = 0, threads: int = 2,
        resume: bool = False) -> dict[str, Any]:
    """One worker's run (`parallel.launch` starts them): worker 0 writes DIR, the others
    theirs into `parallel.scratch(DIR)`."""
    from serve_app.training.plan import SECONDS_PER_STEP, estimate_s

    setup(threads)
    writer = parallel.rank() == 0
    own = out if writer else parallel.scratch(out)
    log_path = own / "train.log"
    report: dict[str, Any] = {"seed": seed, "threads": threads,
                              "workers": parallel.workers(), "plan": vars(plan), "stages": {}}
    plan = per_worker(plan)
    expected_done, actual_done = 0.0, 0.0
    for i, stage in enumerate(stages):
        folder = own / FOLDERS[stage]
        if resume and (out / FOLDERS[stage] / MARKERS[stage]).is_file():
            _say(log_path, f"{stage}: kept {out / FOLDERS[stage]}")
            continue
        if writer:
            forget_later_stages(out, stage)
        parallel.barrier()
        wall, cpu = time.monotonic(), time.process_time()
        figures = STAGE_FUNCS[stage](out, folder, plan, seed, log_path)
        parallel.barrier()  # every worker's files written, DIR's ready for the next stage
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        report["stages"][stage] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                   "figures": figures}
        if stage in SECONDS_PER_STEP:
            expected_done += estimate_s(plan, (stage,))
            actual_done += wall
        ratio = actual_done / expected_done if expected_done else 1.0
        left = estimate_s(plan, stages[i + 1:]) * ratio
        _say(log_path, f"{stage}: done in {wall / 60:.1f} min (cpu {cpu / 60:.1f} min); "
                       f"about {left / 60:.1f} min left")
    if set(stages) - {"tokenizer", "vae"}:
        wall = time.monotonic()
        report["final"] = final_figures(out, plan)
        report["final"]["wall_s"] = round(time.monotonic() - wall, 1)
        _say(log_path, f"final figures: {report['final']}")
    return report


def per_worker(plan: Any) -> Any:
    """`plan` with each batch and each pool drawn per step or per stage split over the
    workers (`parallel.share`): together they see what one process would."""
    return replace(plan, **{name: parallel.share(getattr(plan, name)) for name in SPLIT})


def forget_later_stages(out: Path, stage: str) -> None:
    """Before `stage` rewrites its folder: the markers of the stages that continue that
    folder after it (`denoiser` -> `layout`, `settle`, `polish`) go, so a later `--resume`
    reruns them on the new weights instead of keeping what they no longer describe."""
    order = list(STAGE_FUNCS)
    for later in order[order.index(stage) + 1:]:
        if FOLDERS[later] == FOLDERS[stage]:
            (out / FOLDERS[later] / MARKERS[later]).unlink(missing_ok=True)


def _say(log_path: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, file=sys.stderr, flush=True)
    with open(log_path, "a") as f:
        f.write(line + "\n")


def _base(out: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(out / FOLDERS["denoiser"],
                                                   torch_dtype=torch.float32)


def vae_as_shipped(out: Path) -> AutoencoderKL:
    """The VAE stage's VAE as the pipeline ships it: float16 weights, run in float32, as
    `_base` loads it for every stage after the denoiser's. So the denoiser learns the
    latents of the encoder that ships, and the stages after it find its encoded pool
    already built (`data.encoded_pool` knows an encoder by its bytes): one encode of the
    pool fewer, ~1 min of a run."""
    return AutoencoderKL.from_pretrained(out / FOLDERS["vae"]).half().float()


def stage_tokenizer(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    build_tokenizer_files(folder)
    return {"vocab": len(load_tokenizer(folder))}


def stage_vae(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    from serve_app.training.vae import train_vae

    _, figures = train_vae(folder, plan.vae, batch=plan.vae_batch, seed=seed, log_path=log)
    return figures


def stage_denoiser(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    from serve_app.training.denoiser import train_denoiser
    from serve_app.training.pipeline import assemble, save

    vae = vae_as_shipped(out)
    tokenizer = load_tokenizer(out / FOLDERS["tokenizer"])
    result = train_denoiser(vae, tokenizer, plan.denoiser, batch=plan.batch, pool=plan.pool,
                            seed=seed, eval_every=plan.eval_every, eval_n=plan.eval_n,
                            log_path=log)
    save(assemble(vae, result.text_encoder, tokenizer, result.unet), folder)
    return {"best": result.best, "history": result.history}


def stage_layout(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """Continues DIR/tiny-sd (`denoiser.train_layout`) and saves it in place, with
    `layout.json` (its figures) as the stage's marker."""
    from serve_app.training.denoiser import train_layout

    return _continue(out, folder, "layout", train_layout, plan.layout, plan.layout_batch,
                     plan, seed, log)


def stage_settle(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """As `stage_layout`, with `denoiser.train_settle`."""
    from serve_app.training.denoiser import train_settle

    return _continue(out, folder, "settle", train_settle, plan.settle, plan.batch, plan,
                     seed, log)


def stage_polish(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """As `stage_layout`, with `denoiser.train_polish`."""
    from serve_app.training.denoiser import train_polish

    return _continue(out, folder, "polish", train_polish, plan.polish, plan.polish_batch,
                     plan, seed, log, evals=1)


def stage_contrast(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """As `stage_layout`, with `contrast.train_contrast`."""
    from serve_app.training.contrast import train_contrast

    return _continue(out, folder, "contrast", train_contrast, plan.contrast,
                     plan.polish_batch, plan, seed, log, evals=1)


def stage_corners(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """As `stage_layout`, with `denoiser.train_corners`."""
    from serve_app.training.denoiser import train_corners

    return _continue(out, folder, "corners", train_corners, plan.corners, plan.polish_batch,
                     plan, seed, log, evals=1)


def _continue(out: Path, folder: Path, stage: str, train: Any, steps: int, batch: int,
              plan: Any, seed: int, log: Path, evals: int = 2) -> dict:
    """Trains DIR/tiny-sd further with `train`, evaluated `evals` times (the best of those
    evaluations' EMA weights is kept), and saves it in place with the stage's marker."""
    from serve_app.training.pipeline import assemble, save

    base = _base(out)
    result = train(base.vae, base.tokenizer, base.text_encoder, base.unet, steps, batch=batch,
                   pool=plan.pool, seed=seed, eval_every=max(1, steps // evals),
                   eval_n=plan.eval_n, log_path=log)
    save(assemble(base.vae, result.text_encoder, base.tokenizer, result.unet), folder)
    figures = {"best": result.best, "history": result.history}
    (folder / MARKERS[stage]).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def stage_decoder(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    """Fine-tunes DIR/tiny-sd's VAE decoder on its denoiser's latents
    (`decoder.train_decoder`) and saves the pipeline in place, with `decoder.json`."""
    from serve_app.training.decoder import train_decoder
    from serve_app.training.pipeline import assemble, save

    base = _base(out)
    vae, figures = train_decoder(base, plan.decoder, batch=plan.decoder_batch,
                                 pool=plan.decoder_pool, seed=seed, log_path=log)
    save(assemble(vae, base.text_encoder, base.tokenizer, base.unet), folder)
    (folder / MARKERS["decoder"]).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def stage_inpaint(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    from serve_app.training.inpaint import train_inpaint
    from serve_app.training.pipeline import assemble, save

    base = _base(out)
    unet = train_inpaint(base.vae, base.text_encoder, base.tokenizer, base.unet, plan.inpaint,
                         batch=plan.batch, seed=seed, log_path=log)
    pipe = assemble(base.vae, base.text_encoder, base.tokenizer, unet)
    save(pipe, folder)
    n = 6 if plan.inpaint < 10 else 60
    figures, _, _ = checks.measure_inpaint(pipe, n)
    return figures


def stage_lora(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    from serve_app.training.lora import save_lora, train_lora

    base = _base(out)
    unet = train_lora(base.vae, base.text_encoder, base.tokenizer, base.unet, plan.lora,
                      batch=plan.batch, pool=plan.companion_pool, seed=seed, log_path=log)
    path = save_lora(unet, folder)
    figures, _ = checks.measure_lora(_base(out), folder, quality_grid(
        6 if plan.lora < 10 else 45, seed=seed + 5))
    return {"file": str(path), **figures}


def stage_controlnet(out: Path, folder: Path, plan: Any, seed: int, log: Path) -> dict:
    from serve_app.training.controlnet import train_controlnet
    from serve_app.training.pipeline import save_half

    base = _base(out)
    net = train_controlnet(base.vae, base.text_encoder, base.tokenizer, base.unet,
                           plan.controlnet, batch=plan.batch, pool=plan.companion_pool,
                           seed=seed, log_path=log)
    save_half(net, folder)
    figures, _, _ = checks.measure_controlnet(base, ControlNetModel.from_pretrained(folder),
                                              6 if plan.controlnet < 10 else 60)
    return figures


def final_figures(out: Path, plan: Any) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if (out / FOLDERS["denoiser"] / MARKERS["denoiser"]).is_file():
        scores, _, _ = measure(_base(out), quality_grid(plan.quality_n))
        figures["quality"] = {k: round(v, 4) for k, v in scores.items()}
    if (out / FOLDERS["inpaint"] / MARKERS["inpaint"]).is_file():
        StableDiffusionInpaintPipeline.from_pretrained(out / FOLDERS["inpaint"])  # loads
    shipped = [p for p in out.rglob("*.safetensors")  # not the VAE stage's, nor a worker's
               if (p.parent.name != "vae" or p.parent.parent != out)
               and parallel.scratch(out) not in p.parents]
    figures["size_mb"] = round(sum(p.stat().st_size for p in shipped) / 2**20, 2)
    return figures


STAGE_FUNCS = {"tokenizer": stage_tokenizer, "vae": stage_vae, "denoiser": stage_denoiser,
               "layout": stage_layout, "settle": stage_settle, "polish": stage_polish,
               "contrast": stage_contrast, "corners": stage_corners, "decoder": stage_decoder,
               "inpaint": stage_inpaint, "lora": stage_lora, "controlnet": stage_controlnet}
