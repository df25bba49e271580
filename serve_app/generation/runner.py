"""`ModelRunner`: one loaded model, one `GenerationTask` -> one pipeline call -> a result.

The plain class a Ray Serve replica wraps (through `ModelWorker`); testable without Ray.

Contract of `generate(task, on_step, should_stop)`:
- Calls are serialized by a lock (a diffusers pipeline is not thread-safe), so several
  threads may call it; they run one after another.
- All `task.num_images` images come from ONE pipeline call with one CPU
  `torch.Generator` per seed, so an image made in a batch is byte-identical to the same
  seed made alone, on any device.
- `on_step(step, total)` runs after every denoising step (`total` is the pipeline's
  timestep count, which second-order samplers make larger than `task.steps`).
- When `should_stop()` turns true, the pipeline stops at the end of the current step and
  `generate` raises `Interrupted` instead of returning a partial result.
- Images are encoded in `task.output_format`; for inpainting, pixels outside the mask are
  exactly the input's. Style transfer is described in `serve_app.generation.style`.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.errors import InvalidRequest
from serve_app.generation.images import (
    binarize_mask,
    decode_mask,
    decode_rgb,
    encode_image,
    fit,
    keep_unmasked,
)
from serve_app.generation.pipelines import (
    PipelineLoader,
    PipelineSet,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    resolve_model_file,
)
from serve_app.generation.prompts import PromptCache
from serve_app.generation.samplers import SamplerFactory
from serve_app.generation.style import IPAdapter, adain_start_image, style_denoise_strength
from serve_app.messages import GenerationResult, GenerationTask, InputImage, JobType
from serve_app.registry import ModelSpec
from serve_app.settings import Settings

StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


class Interrupted(Exception):
    """`should_stop` asked the task to stop; no result was produced."""


class ModelRunner:
    """One model's pipelines on one device. See the module docstring for the contract."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        *,
        device: str | None = None,
        loader: PipelineLoader = load_pipeline,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(spec.runtime.device, device)
        self.dtype = resolve_dtype(spec.runtime.dtype, self.device)
        base = loader(spec, settings, self.device, self.dtype)
        if not settings.enable_nsfw_filter and getattr(base, "safety_checker", None) is not None:
            # A custom loader may bring a checker the settings do not want.
            base.safety_checker = None
        self._pipes = PipelineSet(base, batch_invariant=spec.runtime.batch_invariant)
        self._samplers = SamplerFactory(base.scheduler.config)
        self._prompts = PromptCache()
        self._ip_adapter = _ip_adapter(spec, settings)
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The loaded (text2img or inpainting) pipeline."""
        return self._pipes.base

    def close(self) -> None:
        """Drop the pipelines and hand their memory back (on a GPU, to the driver), after
        the running call, if any, has finished."""
        with self._lock:
            self._pipes = None  # type: ignore[assignment]
            self._prompts.clear()
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
    ) -> GenerationResult:
        with self._lock:
            # Timed from here: waiting for the lock is queueing, not generation.
            started = time.perf_counter()
            if self._pipes is None:
                raise RuntimeError(f"model {self.spec.id} was unloaded (replica shutting down)")
            if should_stop is not None and should_stop():
                raise Interrupted(f"task {task.job_id} was stopped before it started")
            images, nsfw = self._run(task, _StepHook(on_step, should_stop))
        encoded = [encode_image(img, task.output_format, task.quality) for img in images]
        return GenerationResult(
            images=encoded,
            seeds=task.seeds,
            content_type=task.output_format.content_type,
            nsfw_detected=nsfw,
            time_taken_ms=round((time.perf_counter() - started) * 1000),
            model=self.spec.id,
        )

    def generate_batch(
        self,
        tasks: list[GenerationTask],
        on_step: StepCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[GenerationResult]:
        """Several jobs' tasks in one pipeline call when they share a `batch_key` (and the
        pipeline is a plain SD text2img one), else one call after another. Each image is
        byte-identical to the one its task would make alone."""
        keys = {t.batch_key() for t in tasks}
        if len(tasks) == 1 or None in keys or len(keys) > 1 or not self._batchable():
            return [dataclasses.replace(self.generate(t, on_step, should_stop), job_id=t.job_id)
                    for t in tasks]
        started = time.perf_counter()
        with self._lock:
            if should_stop is not None and should_stop():
                raise Interrupted(f"batch of {len(tasks)} was stopped before it started")
            images, nsfw = self._text2img_batch(tasks, _StepHook(on_step, should_stop))
        elapsed = round((time.perf_counter() - started) * 1000)
        results, offset = [], 0
        for task in tasks:
            n = task.num_images
            encoded = [encode_image(img, task.output_format, task.quality)
                       for img in images[offset:offset + n]]
            results.append(GenerationResult(
                images=encoded, seeds=task.seeds, content_type=task.output_format.content_type,
                nsfw_detected=nsfw[offset:offset + n], time_taken_ms=elapsed,
                model=self.spec.id, job_id=task.job_id,
            ))
            offset += n
        return results

    def _batchable(self) -> bool:
        return self.spec.pipeline == "sd" and not self._pipes.inpaint_route

    def _text2img_batch(
        self, tasks: list[GenerationTask], hook: _StepHook
    ) -> tuple[list[Image.Image], list[bool]]:
        first = tasks[0]
        pipe = self._pipes.text2img()
        cfg = _guided(pipe, first)
        # Each prompt is encoded on its own (or comes from the cache), exactly as an
        # unbatched call encodes it: the text encoder's output varies with batch shape.
        positive, negative = [], []
        for task in tasks:
            pe, ne = self._prompts.embeddings(pipe, task.prompt, task.negative_prompt, cfg)
            positive.append(pe.repeat_interleave(task.num_images, dim=0))
            if cfg:
                negative.append(ne.repeat_interleave(task.num_images, dim=0))
        seeds = [s for task in tasks for s in task.seeds]
        return self._call(
            pipe, first, hook, seeds=seeds, prompt=None, negative_prompt=None,
            num_images_per_prompt=1, prompt_embeds=torch.cat(positive),
            negative_prompt_embeds=torch.cat(negative) if cfg else None,
            width=first.width, height=first.height,
        )

    # -- one pipeline call per mode -------------------------------------------------------

    def _run(self, task: GenerationTask, hook: _StepHook) -> tuple[list[Image.Image], list[bool]]:
        multiple = int(self._pipes.base.vae_scale_factor)
        if task.width % multiple or task.height % multiple:
            raise InvalidRequest(
                f"width and height must be multiples of {multiple} for model {self.spec.id!r} "
                f"(got {task.width}x{task.height})"
            )
        if task.mode is JobType.TEXT2IMG:
            if self._pipes.inpaint_route:
                return self._inpaint(task, hook, *_blank_canvas(task), strength=1.0)
            if self._batchable():  # a plain SD pipeline: cached prompt embeddings
                return self._text2img_batch([task], hook)
            return self._call(
                self._pipes.text2img(), task, hook, width=task.width, height=task.height
            )
        if task.mode is JobType.IMG2IMG:
            init = _input_rgb(task, task.init_image, "init_image")
            return self._img2img(task, hook, init, task.strength)
        if task.mode is JobType.INPAINT:
            image = _input_rgb(task, task.init_image, "image")
            mask = decode_mask(_need(task.mask_image, "mask", task))
            return self._inpaint(task, hook, image, mask, strength=task.strength)
        if task.mode is JobType.STYLE_TRANSFER:
            return self._style(task, hook)
        raise InvalidRequest(f"unsupported mode {task.mode!r}")

    def _img2img(
        self,
        task: GenerationTask,
        hook: _StepHook,
        init: Image.Image,
        strength: float,
        **extra: Any,
    ) -> tuple[list[Image.Image], list[bool]]:
        if self._pipes.inpaint_route:
            # A 9-channel UNet does img2img as inpainting with an all-white mask.
            white = Image.new("L", init.size, 255)
            return self._inpaint(task, hook, init, white, strength=strength, **extra)
        pipe = self._pipes.img2img()
        return self._call(
            pipe, task, hook, image=init, strength=_strength(strength, task.steps), **extra
        )

    def _inpaint(
        self,
        task: GenerationTask,
        hook: _StepHook,
        image: Image.Image,
        mask: Image.Image,
        strength: float,
        **extra: Any,
    ) -> tuple[list[Image.Image], list[bool]]:
        mask = binarize_mask(mask, task.width, task.height)
        images, nsfw = self._call(
            self._pipes.inpaint(),
            task,
            hook,
            image=image,
            mask_image=mask,
            width=task.width,
            height=task.height,
            strength=_strength(strength, task.steps),
            **extra,
        )
        flagged = nsfw or [False] * len(images)
        # A flagged image stays blacked out; others get the exact input outside the mask.
        images = [
            img if bad else keep_unmasked(img, image, mask)
            for img, bad in zip(images, flagged, strict=True)
        ]
        return images, nsfw

    def _style(self, task: GenerationTask, hook: _StepHook) -> tuple[list[Image.Image], list[bool]]:
        content = _input_rgb(task, task.init_image, "content_image")
        style = decode_rgb(_need(task.style_image, "style_image", task))
        if task.style_strength <= 0:
            # No style asked for: the content itself (a VAE round trip would only blur it).
            return [content] * task.num_images, []
        strength = style_denoise_strength(task.style_strength, task.content_strength)
        if self._ip_adapter is not None:
            pipe = self._pipes.img2img()
            with self._ip_adapter.attached(pipe, scale=task.style_strength):
                return self._img2img(task, hook, content, strength, ip_adapter_image=style)
        start = adain_start_image(self._pipes.base, content, style, task.style_strength)
        return self._img2img(task, hook, start, strength)

    def _call(
        self,
        pipe: DiffusionPipeline,
        task: GenerationTask,
        hook: _StepHook,
        seeds: list[int] | None = None,
        **kwargs: Any,
    ) -> tuple[list[Image.Image], list[bool]]:
        pipe.scheduler = self._samplers.get(task.sampler)
        self._pipes.unet.blocks = 2 if _guided(pipe, task) else 1
        call: dict[str, Any] = {
            "prompt": task.prompt,
            "negative_prompt": task.negative_prompt or None,
            "num_images_per_prompt": task.num_images,
        } | kwargs
        # inference_mode, not only the pipeline's no_grad: no version counters or view
        # tracking (6% of a 64 px / 1-step call here); the numbers are the same.
        with _cpu_threads(self.device, task), torch.inference_mode():
            output = pipe(
                num_inference_steps=task.steps,
                guidance_scale=task.guidance_scale,
                # CPU generators: the same seed gives the same image on any device.
                generator=[torch.Generator(device="cpu").manual_seed(s)
                           for s in (seeds or task.seeds)],
                callback_on_step_end=hook,
                output_type="pil",
                **call,
            )
        if hook.stopped:
            raise Interrupted(f"task {task.job_id} was stopped after {hook.steps} step(s)")
        flags = output.nsfw_content_detected
        return list(output.images), [bool(f) for f in flags] if flags is not None else []


# Below this many pixels per image a CPU call runs on one thread: a second one costs more
# in synchronization than it saves on layers this small (through the service, 64 px / 1 step:
# p50 49 ms on one thread, 57 ms on two), while batches of 128 px images gain from two.
SMALL_IMAGE_PIXELS = 128 * 128


@contextmanager
def _cpu_threads(device: str, task: GenerationTask) -> Iterator[None]:
    """One torch thread for small images on a CPU, else the replica's count. It depends on
    the image size only, so a job gets the same count batched or alone (the layers are
    batch-invariant at any one thread count, not across counts)."""
    threads = torch.get_num_threads()
    if device != "cpu" or threads == 1 or task.width * task.height >= SMALL_IMAGE_PIXELS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _StepHook:
    """The pipeline's `callback_on_step_end`: reports progress and requests interruption."""

    def __init__(self, on_step: StepCallback | None, should_stop: StopCheck | None) -> None:
        self._on_step = on_step
        self._should_stop = should_stop
        self.steps = 0
        self.stopped = False

    def __call__(
        self, pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        self.steps = step + 1
        if self._on_step is not None:
            self._on_step(step + 1, int(pipe.num_timesteps))
        if self._should_stop is not None and self._should_stop():
            # diffusers' supported way to stop: the loop skips the remaining steps.
            pipe._interrupt = True
            self.stopped = True
        return tensors


def _guided(pipe: DiffusionPipeline, task: GenerationTask) -> bool:
    """Whether the call runs classifier-free guidance (the pipelines' own test, in
    `do_classifier_free_guidance`): every image then goes through the UNet twice."""
    return task.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def _strength(strength: float, steps: int) -> float:
    """At least one denoising step: diffusers refuses `int(steps * strength) == 0`."""
    floor = (1.0 + 1e-6) / steps
    return min(1.0, max(strength, floor))


def _blank_canvas(task: GenerationTask) -> tuple[Image.Image, Image.Image]:
    """Image and all-white mask that make an inpainting model draw from scratch."""
    size = (task.width, task.height)
    return Image.new("RGB", size, (127, 127, 127)), Image.new("L", size, 255)


def _need(image: InputImage | None, name: str, task: GenerationTask) -> InputImage:
    if image is None:
        raise InvalidRequest(f"{task.mode.value} needs '{name}'")
    return image


def _input_rgb(task: GenerationTask, image: InputImage | None, name: str) -> Image.Image:
    """An input image decoded and resized to the task's output size."""
    return fit(decode_rgb(_need(image, name, task)), task.width, task.height)


def _ip_adapter(spec: ModelSpec, settings: Settings) -> IPAdapter | None:
    if not spec.ip_adapter:
        return None
    weights = resolve_model_file(settings, spec.ip_adapter)
    encoder = (
        resolve_model_file(settings, spec.image_encoder)
        if spec.image_encoder
        else (weights if weights.is_dir() else weights.parent) / "image_encoder"
    )
    return IPAdapter(weights, encoder)
