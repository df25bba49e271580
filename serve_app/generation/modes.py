"""`ModeCalls`: one task (or one batch of text2img tasks) -> one pipeline call, per mode.

Used by `ModelRunner` under its lock; nothing here is thread-safe.

- text2img: the family's prompt embeddings (cached per prompt, `PromptCache`) are handed
  to the base pipeline; several compatible tasks share one call (`text2img_batch`), each
  prompt encoded alone and one CPU generator per image, so an image made in a batch is
  byte-identical to the same seed made alone.
- img2img and inpainting: the pipelines `from_pipe` derives (SDXL inpainting on
  `StableDiffusionXLInpaintPipeline`, FLUX on `FluxInpaintPipeline`); pixels outside an
  inpainting mask are copied back from the input after decoding.
- style transfer: `serve_app.generation.style` (IP-Adapter, else AdaIN + img2img).
- outpainting: the inpainting call on a padded canvas (`serve_app.generation.outpaint`), its
  output composited back so pixels outside the new area and seam are the input's.
- upscaling: no pipeline; `serve_app.generation.upscalers`, progress per tile.
A model with a 9-channel inpainting UNet runs every mode through its inpainting pipeline.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.errors import InvalidRequest
from serve_app.generation import outpaint
from serve_app.generation.controlnets import ControlNets, control_image
from serve_app.generation.hires import ImageUpscaler
from serve_app.generation.images import binarize_mask, decode_mask, decode_rgb, fit, keep_unmasked
from serve_app.generation.pipelines import PipelineSet
from serve_app.generation.previews import Previewer
from serve_app.generation.prompts import PromptCache
from serve_app.generation.samplers import SamplerFactory
from serve_app.generation.speedups import attention_kernels
from serve_app.generation.steps import Interrupted, StepHook, cpu_threads
from serve_app.generation.style import IPAdapter, adain_start_image, style_denoise_strength
from serve_app.generation.upscalers import Upscalers
from serve_app.messages import GenerationTask, InputImage, JobType

Images = tuple[list[Image.Image], list[bool]]  # images, and NSFW flags ([] without a checker)


class ModeCalls:
    """One model's per-mode pipeline calls (see the module docstring)."""

    def __init__(self, model_id: str, pipes: PipelineSet, device: str,
                 ip_adapter: IPAdapter | None = None,
                 controls: ControlNets | None = None, attention_backend: str = "auto",
                 upscalers: Upscalers | None = None) -> None:
        self.model_id = model_id
        self.upscalers = upscalers
        self.attention_backend = attention_backend
        self.pipes = pipes
        self.family = pipes.family
        self.device = device
        self.samplers = SamplerFactory(pipes.base.scheduler.config, self.family.flow_matching)
        base = pipes.base
        self.prompts = PromptCache(lambda p, n, g: self.family.encode(base, p, n, g))
        self.ip_adapter = ip_adapter
        self.controls = controls
        self.previewer = Previewer()
        # Image upscalers beyond Pillow's, by name, for the hires fix (model upscalers).
        self.image_upscalers: dict[str, ImageUpscaler] = {}

    @property
    def batchable(self) -> bool:
        """Whether compatible text2img tasks may share one call (and lone text2img uses
        cached embeddings): the family keeps batched images identical, and the model is
        not a 9-channel inpainting one."""
        return self.family.batchable and not self.pipes.inpaint_route

    def run(self, task: GenerationTask, hook: StepHook) -> Images:
        if task.mode is JobType.UPSCALE:
            return self._upscale(task, hook)
        multiple = self.family.size_multiple(self.pipes.base)
        if task.width % multiple or task.height % multiple:
            raise InvalidRequest(
                f"width and height must be multiples of {multiple} for model {self.model_id!r} "
                f"(got {task.width}x{task.height})"
            )
        if task.control is not None:
            return self._controlled(task, hook)
        if task.mode is JobType.TEXT2IMG:
            if self.pipes.inpaint_route:
                return self._inpaint(task, hook, *_blank_canvas(task), strength=1.0)
            if self.batchable:
                return self.text2img_batch([task], hook)
            return self._call(self.pipes.text2img(), task, hook, width=task.width,
                              height=task.height)
        if task.mode is JobType.IMG2IMG:
            init = _input_rgb(task, task.init_image, "init_image")
            return self._img2img(task, hook, init, task.strength)
        if task.mode is JobType.INPAINT:
            image = _input_rgb(task, task.init_image, "image")
            mask = decode_mask(_need(task.mask_image, "mask", task))
            return self._inpaint(task, hook, image, mask, strength=task.strength)
        if task.mode is JobType.STYLE_TRANSFER:
            return self._style(task, hook)
        if task.mode is JobType.OUTPAINT:
            return self._outpaint(task, hook)
        raise InvalidRequest(f"unsupported mode {task.mode!r}")

    def text2img_batch(self, tasks: list[GenerationTask], hook: StepHook,
                       output_type: str = "pil") -> Images:
        """Tasks sharing a `batch_key` in one call: each prompt's embeddings are encoded on
        their own (or come from the cache), exactly as an unbatched call encodes them (the
        text encoders' output varies with batch shape), repeated per image, concatenated."""
        first = tasks[0]
        pipe = self.pipes.text2img()
        seeds = [s for task in tasks for s in task.seeds]
        return self._call(pipe, first, hook, seeds=seeds, prompt=None, negative_prompt=None,
                          num_images_per_prompt=1, width=first.width, height=first.height,
                          output_type=output_type, **self._batch_embeds(pipe, tasks))

    def first_pass(self, tasks: list[GenerationTask], hook: StepHook,
                   output_type: str) -> tuple[list[Any], list[bool]]:
        """A hires fix's first pass (`serve_app.generation.hires`): text2img as `run` makes
        it, as PIL images or (`output_type` "latent") the latents, one per image."""
        first = tasks[0]
        if self.pipes.inpaint_route:  # one task: not batchable
            return self._inpaint(first, hook, *_blank_canvas(first), strength=1.0)
        if self.batchable:
            return self.text2img_batch(tasks, hook, output_type)
        return self._call(self.pipes.text2img(), first, hook, width=first.width,
                          height=first.height, output_type=output_type)

    def refine(self, tasks: list[GenerationTask], hook: StepHook,
               image: torch.Tensor | list[Image.Image], strength: float) -> Images:
        """A hires fix's second pass: img2img of `image` (latents, or one upscaled image per
        image of `tasks`, which carry the target size, steps and sampler)."""
        first = tasks[0]
        denoise = _strength(strength, first.steps)
        if self.pipes.inpaint_route:
            white = Image.new("L", (first.width, first.height), 255)
            return self._call(self.pipes.inpaint(), first, hook, image=image, mask_image=white,
                              width=first.width, height=first.height, strength=denoise)
        pipe = self.pipes.img2img()
        extra: dict[str, Any] = {"width": first.width, "height": first.height} \
            if _takes_size(type(pipe)) else {}
        if self.batchable:
            seeds = [s for task in tasks for s in task.seeds]
            extra |= {"seeds": seeds, "prompt": None, "negative_prompt": None,
                      "num_images_per_prompt": 1, **self._batch_embeds(pipe, tasks)}
        return self._call(pipe, first, hook, image=image, strength=denoise, **extra)

    def _batch_embeds(self, pipe: DiffusionPipeline,
                      tasks: list[GenerationTask]) -> dict[str, torch.Tensor]:
        cfg = self.family.classifier_free(pipe, tasks[0])
        rows: dict[str, list[torch.Tensor]] = {}
        for task in tasks:
            # Keyed by the LoRAs too: a LoRA may change the text encoders.
            for name, tensor in self.prompts.embeddings(task.prompt, task.negative_prompt,
                                                        cfg, task.loras).items():
                rows.setdefault(name, []).append(
                    tensor.repeat_interleave(task.num_images, dim=0))
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def _controlled(self, task: GenerationTask, hook: StepHook) -> Images:
        """text2img or img2img steered by the task's ControlNet (`controlnets`)."""
        control = task.control
        if control is None or self.controls is None:
            raise InvalidRequest(f"model {self.model_id!r} has no ControlNets")
        pipe = self.controls.pipeline(control.model, task.mode)
        condition = control_image(control, task.width, task.height)
        scale = {"controlnet_conditioning_scale": control.conditioning_scale}
        if task.mode is JobType.TEXT2IMG:
            return self._call(pipe, task, hook, image=condition, width=task.width,
                              height=task.height, **scale)
        init = _input_rgb(task, task.init_image, "init_image")
        return self._call(pipe, task, hook, image=init, control_image=condition,
                          strength=_strength(task.strength, task.steps), **scale)

    def _img2img(self, task: GenerationTask, hook: StepHook, init: Image.Image,
                 strength: float, **extra: Any) -> Images:
        if self.pipes.inpaint_route:
            # A 9-channel UNet does img2img as inpainting with an all-white mask.
            white = Image.new("L", init.size, 255)
            return self._inpaint(task, hook, init, white, strength=strength, **extra)
        pipe = self.pipes.img2img()
        if _takes_size(type(pipe)):
            # FLUX and SD 3 would otherwise make their default size, not the image's.
            extra = {"width": task.width, "height": task.height, **extra}
        return self._call(pipe, task, hook, image=init, strength=_strength(strength, task.steps),
                          **extra)

    def _inpaint(self, task: GenerationTask, hook: StepHook, image: Image.Image,
                 mask: Image.Image, strength: float, **extra: Any) -> Images:
        mask = binarize_mask(mask, task.width, task.height)
        images, nsfw = self._call(
            self.pipes.inpaint(), task, hook, image=image, mask_image=mask, width=task.width,
            height=task.height, strength=_strength(strength, task.steps), **extra,
        )
        flagged = nsfw or [False] * len(images)
        # A flagged image stays blacked out; others get the exact input outside the mask.
        images = [
            img if bad else keep_unmasked(img, image, mask)
            for img, bad in zip(images, flagged, strict=True)
        ]
        return images, nsfw

    def _outpaint(self, task: GenerationTask, hook: StepHook) -> Images:
        if task.outpaint is None:
            raise InvalidRequest("outpaint needs the padding on each side")
        *pads, seam = task.outpaint
        left, top, right, bottom = pads
        canvas = outpaint.prepare(decode_rgb(_need(task.init_image, "image", task)),
                                  (left, top, right, bottom), seam)
        if canvas.image.size != (task.width, task.height):
            raise InvalidRequest(f"outpaint canvas is {canvas.image.size}, the task "
                                 f"{task.width}x{task.height}")
        images, nsfw = self._inpaint(task, hook, canvas.image, canvas.mask,
                                     strength=task.strength)
        flagged = nsfw or [False] * len(images)
        return [img if bad else outpaint.composite(img, canvas)
                for img, bad in zip(images, flagged, strict=True)], nsfw

    def _upscale(self, task: GenerationTask, hook: StepHook) -> Images:
        if self.upscalers is None or task.upscaler is None:
            raise InvalidRequest(f"model {self.model_id!r} cannot upscale here")
        image = decode_rgb(_need(task.init_image, "image", task))
        out = self.upscalers.upscale(image, task.upscaler, task.width, task.height,
                                     progress=hook.tick)
        return [out], []

    def _style(self, task: GenerationTask, hook: StepHook) -> Images:
        content = _input_rgb(task, task.init_image, "content_image")
        style = decode_rgb(_need(task.style_image, "style_image", task))
        if task.style_strength <= 0:
            # No style asked for: the content itself (a VAE round trip would only blur it).
            return [content] * task.num_images, []
        strength = style_denoise_strength(task.style_strength, task.content_strength)
        if self.ip_adapter is not None:
            pipe = self.pipes.img2img()
            with self.ip_adapter.attached(pipe, scale=task.style_strength):
                return self._img2img(task, hook, content, strength, ip_adapter_image=style)
        start = adain_start_image(self.pipes.base, content, style, task.style_strength)
        return self._img2img(task, hook, start, strength)

    def _call(self, pipe: DiffusionPipeline, task: GenerationTask, hook: StepHook,
              seeds: list[int] | None = None, output_type: str = "pil",
              **kwargs: Any) -> Images:
        pipe.scheduler = self.samplers.get(task.sampler)
        blocks = 2 if self.family.classifier_free(pipe, task) else 1
        self.pipes.denoiser.blocks = blocks
        if self.controls is not None:
            self.controls.set_blocks(blocks)
        call = (self.family.call_kwargs(pipe, task)
                | {"num_images_per_prompt": task.num_images} | kwargs)
        # inference_mode, not only the pipeline's no_grad: no version counters or view
        # tracking (6% of a 64 px / 1-step call here); the numbers are the same.
        with (self.pipes.step_cache.call(), cpu_threads(self.device, task),
              attention_kernels(self.attention_backend, self.device), torch.inference_mode()):
            output = pipe(
                num_inference_steps=task.steps,
                # CPU generators: the same seed gives the same image on any device.
                generator=[torch.Generator(device="cpu").manual_seed(s)
                           for s in (seeds or task.seeds)],
                callback_on_step_end=hook,
                output_type=output_type,
                **call,
            )
        if hook.stopped:
            raise Interrupted(f"task {task.job_id} was stopped after {hook.steps} step(s)")
        flags = getattr(output, "nsfw_content_detected", None)
        return list(output.images), [bool(f) for f in flags] if flags is not None else []


@functools.cache
def _takes_size(cls: type) -> bool:
    """Whether a pipeline's call takes `width`/`height` (SD and SDXL img2img do not: they
    keep the init image's size, which is already the task's)."""
    return "width" in inspect.signature(cls.__call__).parameters


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
