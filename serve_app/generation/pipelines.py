"""Loading a model's pipeline and deriving the per-mode pipelines from it.
(Over ~300 lines: loading, runtime knobs and the per-mode set share one model's state.)

Contract:
- `load_pipeline(spec, settings, device, dtype)` is the default pipeline factory that
  `ModelRunner` takes (injectable, so tests and benchmarks can pass their own). It loads a
  diffusers folder with `from_pretrained`, a single `.safetensors`/`.ckpt` file with
  `from_single_file`, and builds the embedded tiny models on first use. Nothing here ever
  reaches a model hub (`local_files_only=True`). `spec.pipeline` picks diffusers' own
  pipeline class: SD 1.x, SDXL, FLUX.1 or SD 3.x (`PIPELINE_CLASSES`).
- Runtime knobs (`spec.runtime`): device `auto` means CUDA when present; half precision,
  CPU offload and `torch.compile` are CUDA knobs and are ignored on a CPU (float16 matmuls
  there are slow or unsupported); channels-last (UNets and VAEs), VAE tiling/slicing and
  attention slicing apply everywhere. SDPA attention is diffusers' default.
- `PipelineSet` derives img2img and inpainting pipelines lazily with
  `AutoPipelineFor*.from_pipe`, which shares the loaded modules (no extra memory): SDXL's
  inpainting runs on `StableDiffusionXLInpaintPipeline`, FLUX's on `FluxInpaintPipeline`.
  A model with a 9-channel inpainting UNet cannot run the plain text2img/img2img
  pipelines, so its set routes every mode through the inpainting pipeline (see
  `needs_inpaint_route`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from serve_app.errors import ConfigError
from serve_app.generation.batching import BatchInvariantDenoiser
from serve_app.generation.families import Family, family_of
from serve_app.generation.speedups import fuse_qkv, quantize_denoiser
from serve_app.generation.step_cache import attach as attach_step_cache
from serve_app.generation.tiny import ensure_tiny_model
from serve_app.model_families import HALF_DTYPES
from serve_app.model_runtime import Runtime, StepCacheSpec
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

log = logging.getLogger(__name__)

PipelineLoader = Callable[[ModelSpec, Settings, str, torch.dtype], DiffusionPipeline]

# (family, is a dedicated inpainting model) -> the class a model is loaded as. FLUX and SD 3
# inpaint on their base models (FluxInpaintPipeline / StableDiffusion3InpaintPipeline via
# from_pipe); their dedicated inpainting models (FLUX.1 Fill) are not supported.
PIPELINE_CLASSES: dict[tuple[str, bool], type[DiffusionPipeline]] = {
    ("sd", False): StableDiffusionPipeline,
    ("sd", True): StableDiffusionInpaintPipeline,
    ("sdxl", False): StableDiffusionXLPipeline,
    ("sdxl", True): StableDiffusionXLInpaintPipeline,
    ("flux", False): FluxPipeline,
    ("sd3", False): StableDiffusion3Pipeline,
}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt")


def resolve_device(requested: str, override: str | None = None) -> str:
    """`override` if given, else the spec's device (`auto`: CUDA when present). A replica
    that was given a GPU (`cuda`, as serve_app.placement resolves a GPU model) and sees no
    CUDA raises: it must fail its start loudly, not run for hours on the CPU."""
    device = override or requested
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but this process sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
            f"{torch.__version__}): refusing to run on the CPU. Check the node's driver and "
            f"that the model's resources give it a GPU (num_gpus)")
    return device


def resolve_dtype(name: str, device: str, family: str = "sd") -> torch.dtype:
    """The spec's dtype on CUDA (`auto`: the family's half precision); float32 on a CPU."""
    if not device.startswith("cuda"):
        return torch.float32
    return _DTYPES[HALF_DTYPES[family] if name == "auto" else name]


def resolve_model_file(settings: Settings, path: str) -> Path:
    """A registry path: absolute as is, else relative to MODEL_PATH (as `weights_path`)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(settings.model_path) / p


def load_pipeline(
    spec: ModelSpec, settings: Settings, device: str, dtype: torch.dtype
) -> DiffusionPipeline:
    """Load `spec`'s pipeline onto `device` with `dtype` and apply its runtime knobs."""
    path = spec.weights_path(settings)
    if spec.is_built:
        ensure_tiny_model(spec.source, path, spec.seed)
    cls = _pipeline_class(spec, path)
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if spec.pipeline == "sd" and not settings.enable_nsfw_filter:
        # Not loading the checker at all saves its ~1.2 GB when the filter is off.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if path.is_dir():
        pipe = cls.from_pretrained(path, **kwargs)
    elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = _from_single_file(cls, path, kwargs)
    else:
        raise ConfigError(
            f"model {spec.id!r}: {path} is neither a diffusers folder nor a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    _place(pipe, spec.runtime, device)
    if device == "cpu":
        realign_weights(pipe)
    apply_runtime(pipe, spec.runtime, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# What torch's CPU allocator guarantees, and what oneDNN's kernels expect of their operands.
_ALIGNMENT = 64


def realign_weights(pipe: DiffusionPipeline) -> int:
    """Copy every weight that is not 64-byte aligned to fresh memory; returns how many.

    `from_single_file` leaves weights where safetensors put them: at the file's offsets,
    8-byte aligned. On a CPU, oneDNN picks other kernels for unaligned operands, which
    moves the last bits of some layers' outputs (measured: the tiny model's time embedding,
    then up to one level in some pixels of a 64 px image): the same weights would make
    different images from a single file than from a folder. Aligned, they make the same.
    """
    moved = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()
                moved += 1
    return moved


def _pipeline_class(spec: ModelSpec, path: Path) -> type[DiffusionPipeline]:
    inpainting = _is_inpainting(spec, path)
    cls = PIPELINE_CLASSES.get((spec.pipeline, inpainting))
    if cls is None:
        raise ConfigError(
            f"model {spec.id!r}: dedicated {spec.pipeline} inpainting models are not supported; "
            f"list the base model (type: base): it inpaints with its own inpainting pipeline"
        )
    return cls


def _place(pipe: DiffusionPipeline, runtime: Runtime, device: str) -> None:
    """Onto `device`, or, with `runtime.cpu_offload` on CUDA, into CPU memory with hooks
    that move each model (or layer) onto the GPU while it runs."""
    offload = runtime.cpu_offload if device.startswith("cuda") else "none"
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        if runtime.cpu_offload != "none":
            log.info("runtime.cpu_offload is ignored on %s", device)
        pipe.to(device)


def _from_single_file(
    cls: type[DiffusionPipeline], path: Path, kwargs: dict[str, object]
) -> DiffusionPipeline:
    """`from_single_file` needs the pipeline's component configs; offline they come from a
    folder beside the file named after it (`sd15.safetensors` -> `sd15/`, configs and
    tokenizer only), else from a local Hugging Face cache."""
    config_dir = path.with_suffix("")
    if (config_dir / "model_index.json").is_file():
        kwargs = {**kwargs, "config": str(config_dir)}
    try:
        return cls.from_single_file(str(path), **kwargs)  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load {path} as a single-file checkpoint offline ({exc}). Put the "
            f"pipeline's configs (model_index.json, component config.json files and the "
            f"tokenizer) in {config_dir}/, or convert the checkpoint to a diffusers folder"
        ) from exc


def _is_inpainting(spec: ModelSpec, path: Path) -> bool:
    if spec.source == "tiny-inpaint" or spec.type == "inpainting":
        return True
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        return json.loads(unet_config.read_text()).get("in_channels") == 9
    return False


def apply_runtime(pipe: DiffusionPipeline, runtime: Runtime, device: str) -> None:
    """Apply the spec's speed/memory knobs to a loaded pipeline (see module docstring)."""
    on_cuda = device.startswith("cuda")
    if runtime.fuse_qkv:
        fuse_qkv(pipe)
    denoiser = denoiser_of(pipe)
    quantize_denoiser(denoiser, runtime.quantize, device)
    if runtime.channels_last:
        # A memory layout for 4-D convolution inputs: transformers' token tensors have none.
        if getattr(pipe, "unet", None) is not None:
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if runtime.vae_tiling:
        pipe.vae.enable_tiling()
    if runtime.vae_slicing:
        # PipelineSet turns slicing on anyway for batch-invariant models.
        pipe.vae.enable_slicing()
    if runtime.attention_slicing:
        pipe.enable_attention_slicing()
    if runtime.compile and on_cuda:
        # In place: the denoiser keeps its type and config, so from_pipe and IP-Adapter
        # work. Default mode: autotuning would add minutes to every replica start, and CUDA
        # graphs fit badly with per-task sizes and batch splits.
        denoiser.compile()
    elif runtime.compile:
        log.info("runtime.compile is ignored on %s", device)


def pin_execution_device(pipe: DiffusionPipeline) -> None:
    """Fix `pipe._execution_device` to the device it is on now.

    diffusers recomputes it on every call (and `encode_prompt` asks again) by walking every
    module of every component for offload hooks: 4 ms a call for the tiny model on a CPU,
    a tenth of a 64 px job. The answer cannot change after loading (with CPU offload it is
    the GPU the hooks move modules to, set once by `_place`). The
    pipeline becomes an instance of a subclass under the same name, so diffusers' lookups
    by class name (`from_pipe`, `AutoPipeline*`) still work.
    """
    device = pipe._execution_device
    if not getattr(type(pipe), "_pins_device", False):
        pipe.__class__ = _pinned_class(type(pipe))
    pipe._pinned_device = device


@functools.cache
def _pinned_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
        "_pins_device": True,
        "_execution_device": property(lambda self: self._pinned_device),
    })


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The UNet, or the transformer of FLUX / SD 3 pipelines."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def needs_inpaint_route(pipe: DiffusionPipeline) -> bool:
    """Whether the UNet takes 9 channels (latents + mask + masked image)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and int(unet.config.in_channels) == 9


class PipelineSet:
    """The loaded pipeline and the per-mode pipelines derived from it, created once each.

    All of them share one denoiser, batch-invariant where the runtime says so (and the VAE
    then in slicing mode; see `serve_app.generation.batching`). Not thread-safe: the runner
    calls it under its lock.
    """

    def __init__(self, base: DiffusionPipeline, family: Family | None = None,
                 batch_invariant: bool = True, device: str | None = None,
                 step_cache: StepCacheSpec | None = None, model_id: str = "model") -> None:
        self.base = base
        self.family = family or family_of("sd")
        self.inpaint_route = needs_inpaint_route(base)
        self.denoiser = BatchInvariantDenoiser(
            self.family.denoiser(base), enabled=batch_invariant,
            on_cpu=None if device is None else device == "cpu",
        )
        if step_cache is not None and self.denoiser.split:
            raise ConfigError(
                f"model {model_id}: runtime.step_cache cannot be combined with "
                f"batch_invariant: true on a GPU (the per-image split); leave batch_invariant "
                f"at auto")
        # Outside the invariance wrapper: a cached step skips layers, whatever the batch.
        self.step_cache = attach_step_cache(self.family.denoiser(base), step_cache, model_id)
        if batch_invariant:
            base.vae.enable_slicing()
        pin_execution_device(base)
        self._img2img: DiffusionPipeline | None = None
        self._inpaint: DiffusionPipeline | None = None

    def text2img(self) -> DiffusionPipeline:
        return self.inpaint() if self.inpaint_route else self.base

    def img2img(self) -> DiffusionPipeline:
        if self.inpaint_route:
            return self.inpaint()
        if self._img2img is None:
            self._img2img = self._derive(AutoPipelineForImage2Image)
        return self._img2img

    def inpaint(self) -> DiffusionPipeline:
        if self._inpaint is None:
            self._inpaint = self._derive(AutoPipelineForInpainting)
        return self._inpaint

    def _derive(self, auto: type) -> DiffusionPipeline:
        pipe = auto.from_pipe(self.base)
        pipe.set_progress_bar_config(disable=True)
        pin_execution_device(pipe)
        return pipe
