"""`ModelRunner`: one loaded model, one `GenerationTask` -> one pipeline call -> a result.

The plain class a Ray Serve replica wraps (through `ModelWorker`); testable without Ray.
It owns the model's lifecycle, the lock and the results; what each mode's call looks like
is `serve_app.generation.modes`, what differs between SD 1.x, SDXL, FLUX and SD 3 is
`serve_app.generation.families`, and per-step progress and stopping is
`serve_app.generation.steps`.

Contract of `generate(task, on_step, should_stop)`:
- Calls are serialized by a lock (a diffusers pipeline is not thread-safe), so several
  threads may call it; they run one after another.
- All `task.num_images` images come from ONE pipeline call with one CPU
  `torch.Generator` per seed, so an image made in a batch is byte-identical to the same
  seed made alone, on any device.
- `on_step(step, total)` runs after every denoising step (`total` is the pipeline's
  timestep count, which second-order samplers make larger than `task.steps`); before it,
  `on_preview(step, total, {job_id: jpeg})` gets the latent thumbnails of the tasks with
  `preview_every` due at that step (`serve_app.generation.previews`).
- When `should_stop()` turns true, the pipeline stops at the end of the current step and
  `generate` raises `Interrupted` instead of returning a partial result.
- A sampler the model's family does not take (`ModelSpec.samplers`) or a size it cannot
  make is an `InvalidRequest`, before any step runs.
- A text2img task with `hires` runs in two passes (`serve_app.generation.hires`): its
  images come at the hires size, `on_step` counts both passes and names the second.
- Images are encoded in `task.output_format`; for inpainting, pixels outside the mask are
  exactly the input's. Style transfer is described in `serve_app.generation.style`.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.errors import ConfigError, InvalidRequest
from serve_app.generation.controlnets import ControlNets
from serve_app.generation.families import family_of
from serve_app.generation.hires import HiresRun
from serve_app.generation.images import encode_image
from serve_app.generation.loras import LoraSet
from serve_app.generation.modes import ModeCalls
from serve_app.generation.pipelines import (
    PipelineLoader,
    PipelineSet,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_model_file,
)
from serve_app.generation.previews import PreviewCallback, Previews
from serve_app.generation.safety import prepare_checker
from serve_app.generation.speedups import ArtifactStore, CompileCache, FolderArtifacts
from serve_app.generation.steps import Interrupted, StepCallback, StepHook, StopCheck
from serve_app.generation.style import IPAdapter
from serve_app.generation.upscalers import Upscalers
from serve_app.messages import GenerationResult, GenerationTask, JobType
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

__all__ = ["Interrupted", "ModelRunner"]


class ModelRunner:
    """One model's pipelines on one device. See the module docstring for the contract."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        *,
        device: str | None = None,
        loader: PipelineLoader = load_pipeline,
        compiled: ArtifactStore | None = None,
    ) -> None:
        """`compiled`: where torch.compile's artifacts are shared between replicas (the
        blob store, on a replica); default a folder under the cache dir."""
        self.spec = spec
        self.device = resolve_device(spec.runtime.device, device)
        self.dtype = resolve_dtype(spec.runtime.dtype, self.device, spec.pipeline)
        _check_runtime(spec, self.device)
        self._compile_cache: CompileCache | None = None
        if spec.runtime.compile and self.device.startswith("cuda"):
            store = compiled or FolderArtifacts(Path(settings.cache_dir) / "compile")
            self._compile_cache = CompileCache(store, spec.id, self.device)
            self._compile_cache.load()  # before the first compiled call
        ip_adapter = _ip_adapter(spec, settings)
        base = loader(spec, settings, self.device, self.dtype)
        if not settings.enable_nsfw_filter and getattr(base, "safety_checker", None) is not None:
            # A custom loader may bring a checker the settings do not want.
            base.safety_checker = None
        invariant = spec.runtime.invariant_on(self.device)
        pipes = PipelineSet(base, family_of(spec.pipeline), batch_invariant=invariant,
                            device=self.device, step_cache=spec.runtime.step_cache,
                            model_id=spec.id)
        prepare_checker(base, invariant and self.device == "cpu")
        self._loras = LoraSet(spec, settings, base, pipes.family.denoiser_attr,
                              after_load=pipes.denoiser.refresh)
        controls = (ControlNets(spec, settings, pipes, self.device, self.dtype, invariant)
                    if spec.control_nets else None)
        self._modes: ModeCalls | None = ModeCalls(
            spec.id, pipes, self.device, ip_adapter, controls,
            attention_backend=spec.runtime.attention_backend,
            upscalers=Upscalers(settings, self.device))
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The loaded (text2img or inpainting) pipeline."""
        return self._loaded().pipes.base

    @property
    def batchable(self) -> bool:
        """Whether compatible text2img tasks share one pipeline call (`generate_batch`)."""
        return self._loaded().batchable

    def close(self) -> None:
        """Drop the pipelines and hand their memory back (on a GPU, to the driver), after
        the running call, if any, has finished."""
        with self._lock:
            if self._modes is not None:
                self._modes.prompts.clear()
            self._modes = None
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def warmup(self) -> None:
        """One 1-step 64 px text2img, so the first real job does not pay for lazy setup."""
        task = GenerationTask(
            job_id="warmup",
            mode=JobType.TEXT2IMG,
            prompt="warmup",
            negative_prompt="",
            width=64,
            height=64,
            steps=1,
            guidance_scale=1.0,
            seed=0,
            sampler=self.spec.defaults.sampler,
        )
        self.generate(task)

    def generate(
        self,
        task: GenerationTask,
        on_step: StepCallback | None = None,
        should_stop: StopCheck | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GenerationResult:
        with self._lock:
            # Timed from here: waiting for the lock is queueing, not generation.
            started = time.perf_counter()
            modes = self._ready(task, should_stop, f"task {task.job_id}")
            if task.hires is not None and task.mode is JobType.TEXT2IMG:
                images, nsfw = self._hires(modes, [task], on_step, should_stop, on_preview)
            else:
                previews = Previews.wanted([task], modes.previewer, modes.family, on_preview)
                images, nsfw = modes.run(task, StepHook(on_step, should_stop, previews))
        return self._result(task, images, nsfw, started)

    def generate_batch(
        self,
        tasks: list[GenerationTask],
        on_step: StepCallback | None = None,
        should_stop: StopCheck | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[GenerationResult]:
        """Several jobs' tasks in one pipeline call when they share a `batch_key` (and the
        model is `batchable`), else one call after another. Each image is byte-identical to
        the one its task would make alone."""
        keys = {t.batch_key() for t in tasks}
        if len(tasks) == 1 or None in keys or len(keys) > 1 or not self.batchable:
            return [dataclasses.replace(self.generate(t, on_step, should_stop, on_preview),
                                        job_id=t.job_id)
                    for t in tasks]
        started = time.perf_counter()
        with self._lock:
            modes = self._ready(tasks[0], should_stop, f"batch of {len(tasks)}")
            if tasks[0].hires is not None:  # all of them: the batch key holds it
                images, nsfw = self._hires(modes, tasks, on_step, should_stop, on_preview)
            else:
                previews = Previews.wanted(tasks, modes.previewer, modes.family, on_preview)
                images, nsfw = modes.text2img_batch(tasks,
                                                    StepHook(on_step, should_stop, previews))
        results, offset = [], 0
        for task in tasks:
            n = task.num_images
            results.append(self._result(task, images[offset:offset + n],
                                        nsfw[offset:offset + n], started))
            offset += n
        return results

    def _hires(self, modes: ModeCalls, tasks: list[GenerationTask],
               on_step: StepCallback | None, should_stop: StopCheck | None,
               on_preview: PreviewCallback | None) -> tuple[list[Image.Image], list[bool]]:
        """text2img with a hires fix: both passes (`serve_app.generation.hires`)."""
        task = tasks[0]
        multiple = modes.family.size_multiple(modes.pipes.base)
        if task.width % multiple or task.height % multiple:
            raise InvalidRequest(
                f"width and height must be multiples of {multiple} for model "
                f"{self.spec.id!r} (got {task.width}x{task.height})")
        return HiresRun(modes, tasks, on_step, should_stop, on_preview).run()

    def _loaded(self) -> ModeCalls:
        if self._modes is None:
            raise RuntimeError(f"model {self.spec.id} was unloaded (replica shutting down)")
        return self._modes

    def _ready(self, task: GenerationTask, should_stop: StopCheck | None,
               what: str) -> ModeCalls:
        """The mode calls, once the task may start (under the lock)."""
        modes = self._loaded()
        problem = self.spec.sampler_error(task.sampler)
        if problem is not None:
            raise InvalidRequest(problem)
        if should_stop is not None and should_stop():
            raise Interrupted(f"{what} was stopped before it started")
        self._loras.activate(task.loras)
        return modes

    def _result(self, task: GenerationTask, images: list[Image.Image], nsfw: list[bool],
                started: float) -> GenerationResult:
        if self._compile_cache is not None:
            self._compile_cache.save()  # if that call compiled a new graph
        encoded = [encode_image(img, task.output_format, task.quality) for img in images]
        return GenerationResult(
            images=encoded,
            seeds=task.seeds,
            content_type=task.output_format.content_type,
            nsfw_detected=nsfw,
            time_taken_ms=round((time.perf_counter() - started) * 1000),
            model=self.spec.id,
            job_id=task.job_id,
        )


def _check_runtime(spec: ModelSpec, device: str) -> None:
    """Speed-ups that cannot be combined with what else the model runs with."""
    runtime = spec.runtime
    if runtime.fuse_qkv and spec.loras:
        raise ConfigError(f"model {spec.id!r}: runtime.fuse_qkv cannot be combined with "
                          f"LoRAs (they target the separate q, k and v projections)")
    if runtime.quantize != "none" and runtime.invariant_on(device) and device == "cpu":
        raise ConfigError(f"model {spec.id!r}: runtime.quantize on a CPU needs "
                          f"batch_invariant: false (batch invariance rewrites the plain "
                          f"linear layers that quantization replaces)")


def _ip_adapter(spec: ModelSpec, settings: Settings) -> IPAdapter | None:
    if not spec.ip_adapter:
        return None
    if spec.pipeline not in ("sd", "sdxl"):
        raise ConfigError(f"model {spec.id!r}: IP-Adapter style transfer is supported on SD "
                          f"and SDXL models only, not {spec.pipeline}")
    weights = resolve_model_file(settings, spec.ip_adapter)
    encoder = (
        resolve_model_file(settings, spec.image_encoder)
        if spec.image_encoder
        else (weights if weights.is_dir() else weights.parent) / "image_encoder"
    )
    return IPAdapter(weights, encoder)
