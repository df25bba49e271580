"""GPU throughput of the replica's own pipeline code on a full-size SD 1.5 architecture.

    python bench/gpu.py                      # CUDA, fp16: batch 1, 4, 8; eager and compiled
    python bench/gpu.py --device cpu --tiny  # smoke run: the tiny model on a CPU, seconds

No weights are needed: the UNet (block_out_channels 320/640/1280/1280, cross-attention
768), VAE (128/256/512/512) and CLIP text encoder (12 layers, width 768, vocab 49408) are
built from SD 1.5's configs with seeded random weights, so every matmul and convolution
has its real size (about 51 TFLOP per 512² image at 30 steps with guidance). The tokenizer
is the project's offline byte-level one (`serve_app.generation.tiny`). The pipeline runs
through `ModelRunner` with an injected loader, so what is timed is the replica's own code:
`generate` for batch 1 and `generate_batch` (the tracker's batching) for more, with the
runtime knobs applied by `serve_app.generation.pipelines.apply_runtime` (fp16, and
`unet.compile()` when compiled). On CUDA the UNet runs a batch as per-image sub-batches
for batch invariance (see `serve_app.generation.batching`); `--no-invariance` sets
`runtime.batch_invariant: false` to time one forward for the whole batch.

It prints seconds per image and images per second beside the physical limit: the FLOPs
counted with `torch.utils.flop_counter` over the GPU's dense fp16 tensor peak (or
`--peak-tflops`). The last line of stdout is a JSON summary. It imports torch and diffusers
but never Ray; without CUDA it says so and exits 0 without measuring.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import gc
import json
import tempfile
import time
import warnings
from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# Dense fp16 tensor-core peaks (TFLOP/s), by a substring of torch's device name.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("T4", 65.0),
)
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="the project's tiny model instead of SD 1.5 (smoke runs)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated (default 1,4,8; tiny: 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (tiny: 2)")
    parser.add_argument("--size", type=int, default=None, help="default 512 (tiny: 64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per row after one warm-up call (default 3; tiny 1)")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both",
                        help="run with torch.compile off, on, or both (default)")
    parser.add_argument("--no-invariance", action="store_true",
                        help="runtime.batch_invariant: false (one UNet forward per batch)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense fp16 peak, if not in the built-in table")
    opts = parser.parse_args(argv)
    opts.batch_sizes = [int(b) for b in (opts.batch_sizes or ("1,2" if opts.tiny
                                                              else "1,4,8")).split(",")]
    opts.steps = opts.steps or (2 if opts.tiny else 30)
    opts.size = opts.size or (64 if opts.tiny else 512)
    opts.repeats = opts.repeats or (1 if opts.tiny else 3)
    return opts


# -- the model ---------------------------------------------------------------------------


def build_sd15(workdir: Path, device: str) -> Any:
    """SD 1.5's architecture with seeded random weights, built directly on `device`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from serve_app.generation.tiny import write_tokenizer_files

    vocab_path, _ = write_tokenizer_files(workdir / "tokenizer")
    tokenizer = CLIPTokenizer(vocab=json.loads(vocab_path.read_text()), merges=[],
                              model_max_length=77)
    eos = tokenizer.eos_token_id
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        torch.manual_seed(1)
        vae = AutoencoderKL(**SD15_VAE).eval()
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT, bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos, pad_token_id=eos)).eval()
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)


def make_loader(tiny: bool, workdir: Path) -> Any:
    """A `PipelineLoader` for `ModelRunner`: builds instead of loading, then applies the
    spec's runtime knobs exactly as the replica's default loader does."""

    def loader(spec: Any, settings: Any, device: str, dtype: Any) -> Any:
        from serve_app.generation.pipelines import apply_runtime
        from serve_app.generation.tiny import build_pipeline

        pipe = build_pipeline(workdir / "tiny") if tiny else build_sd15(workdir, device)
        pipe.to(device=device, dtype=dtype)
        apply_runtime(pipe, spec.runtime, device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return loader


def make_runner(opts: argparse.Namespace, compiled: bool, workdir: Path) -> Any:
    from serve_app.generation.runner import ModelRunner
    from serve_app.registry import ModelSpec
    from serve_app.settings import load_settings

    spec = ModelSpec.model_validate({
        "id": "tiny-sd" if opts.tiny else "sd15-random",
        "name": "benchmark model", "description": "random weights", "source": "path",
        "path": str(workdir / "unused"),
        "runtime": {"device": opts.device, "dtype": "float16", "compile": compiled,
                    "batch_invariant": not opts.no_invariance},
        "scaling": {"max_batch_size": max(opts.batch_sizes)},
    })
    settings = load_settings({"store": "memory", "cache_dir": str(workdir / "cache"),
                              "data_dir": str(workdir / "data"), "model_path": str(workdir)})
    return ModelRunner(spec, settings, device=opts.device, loader=make_loader(opts.tiny,
                                                                              workdir))


def tasks(opts: argparse.Namespace, n: int) -> list[Any]:
    from serve_app.messages import GenerationTask, JobType

    return [GenerationTask(job_id=f"gpu-{i}", mode=JobType.TEXT2IMG, prompt=f"{PROMPT} {i}",
                           negative_prompt="", width=opts.size, height=opts.size,
                           steps=opts.steps, guidance_scale=7.5, seed=1000 + i,
                           sampler="euler") for i in range(n)]


# -- FLOPs and the limit -------------------------------------------------------------------


def count_flops(pipe: Any, opts: argparse.Namespace) -> dict[str, float]:
    """FLOPs per image: `steps` UNet calls at batch 2 (guidance), one VAE decode, two text
    encodings (prompt and empty negative), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = pipe.unet.device, pipe.unet.dtype
    latent = opts.size // 8
    unet_forward = type(pipe.unet).forward  # the class's: no batch-invariance split

    def flops(fn: Any) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    tokens = torch.zeros(1, 77, dtype=torch.long, device=device)
    text = flops(lambda: pipe.text_encoder(tokens))
    hidden = torch.zeros(2, 77, pipe.unet.config.cross_attention_dim, device=device,
                         dtype=dtype)
    sample = torch.zeros(2, 4, latent, latent, device=device, dtype=dtype)
    unet = flops(lambda: unet_forward(pipe.unet, sample, 10, encoder_hidden_states=hidden))
    z = torch.zeros(1, 4, latent, latent, device=device, dtype=dtype)
    vae = flops(lambda: pipe.vae.decode(z))
    return {"unet_per_step": unet, "vae_decode": vae, "text_encoder": 2 * text,
            "per_image": opts.steps * unet + vae + 2 * text}


def peak_tflops(opts: argparse.Namespace) -> tuple[str, float | None]:
    import torch

    if opts.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        if opts.peak_tflops:
            return name, opts.peak_tflops
        return name, next((p for key, p in PEAK_TFLOPS if key in name), None)
    return "cpu", opts.peak_tflops


# -- timing ----------------------------------------------------------------------------


def timed_call(runner: Any, batch: list[Any], device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if len(batch) == 1:
        runner.generate(batch[0])
    else:
        runner.generate_batch(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(runner: Any, opts: argparse.Namespace, compiled: bool, limit_s: float | None
            ) -> list[dict[str, Any]]:
    rows = []
    variant = "replica"
    for n in opts.batch_sizes:
        batch = tasks(opts, n)
        first = timed_call(runner, batch, opts.device)  # warm-up (and compile)
        times = [timed_call(runner, batch, opts.device) for _ in range(opts.repeats)]
        best = min(times)
        row = {"compile": compiled, "variant": variant, "batch": n,
               "first_call_s": round(first, 3), "call_s": round(best, 4),
               "s_per_image": round(best / n, 4), "images_per_s": round(n / best, 3),
               "limit_s_per_image": round(limit_s, 4) if limit_s else None,
               "of_limit": round(limit_s / (best / n), 3) if limit_s else None}
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    limit = f"{row['limit_s_per_image']:.4f}" if row["limit_s_per_image"] else "?"
    share = f"{100 * row['of_limit']:.0f}%" if row["of_limit"] else "?"
    print(f"{'on' if row['compile'] else 'off':>7} | {row['variant']:<13} | "
          f"{row['batch']:>5} | {row['s_per_image']:>11.4f} | {row['images_per_s']:>8.2f} | "
          f"{limit:>13} | {share:>8} | {row['first_call_s']:>8.2f}", flush=True)


def free(runner: Any) -> None:
    import torch

    close = getattr(runner, "close", None)
    if close is not None:
        close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import torch

    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        message = ("CUDA is not available on this machine: bench/gpu.py measures GPU "
                   "throughput and needs an NVIDIA GPU with the CUDA build of torch. Nothing "
                   "was measured. For a smoke run on a CPU: python bench/gpu.py --device cpu "
                   "--tiny")
        print(message, file=sys.stderr)
        print(json.dumps({"skipped": message, "torch": torch.__version__}))
        return 0
    # Random weights overflow fp16 somewhere in 30 steps: NaN pixels cost the same FLOPs,
    # and numpy's cast warning about them is noise here.
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")
    from diffusers.utils import logging as diffusers_logging

    # Its "modules that should be kept in float32: []" notice on casting built modules.
    diffusers_logging.set_verbosity_error()
    device_name, peak = peak_tflops(opts)
    modes = {"both": [False, True], "off": [False], "on": [True]}[opts.compile]
    if not opts.device.startswith("cuda") and True in modes:
        print("note: torch.compile is a CUDA knob here (apply_runtime ignores it on a CPU): "
              "compiled rows skipped", file=sys.stderr)
        modes = [False]
    summary: dict[str, Any] = {
        "device": device_name, "torch": torch.__version__, "model": "tiny" if opts.tiny
        else "sd15-random", "size": opts.size, "steps": opts.steps,
        "dtype": "float16" if opts.device.startswith("cuda") else "float32",
        "peak_tflops": peak, "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="imagegen-gpu-bench-") as tmp:
        workdir = Path(tmp)
        for compiled in modes:
            t0 = time.perf_counter()
            runner = make_runner(opts, compiled, workdir)
            load_s = time.perf_counter() - t0
            if "flops" not in summary:
                summary["flops"] = count_flops(runner.pipeline, opts)
                per_image = summary["flops"]["per_image"]
                summary["limit_s_per_image"] = per_image / (peak * 1e12) if peak else None
                print(f"{summary['model']} {opts.size}² {opts.steps} steps, guidance 7.5, "
                      f"{summary['dtype']} on {device_name}: {per_image / 1e12:.2f} TFLOP per "
                      f"image; peak {peak or '?'} TFLOP/s -> limit "
                      f"{summary['limit_s_per_image'] or float('nan'):.4f} s/image")
                print("compile | variant       | batch | s per image | images/s | "
                      "limit s/image | of limit | first call s")
            summary[f"build_s_compile_{'on' if compiled else 'off'}"] = round(load_s, 2)
            summary["rows"] += measure(runner, opts, compiled, summary["limit_s_per_image"])
            if opts.device.startswith("cuda"):
                summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3,
                                                  2)
            free(runner)
            del runner
    summary["ray_imported"] = "ray" in sys.modules
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
