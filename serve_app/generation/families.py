"""Pipeline families: what the runner does differently for SD 1.x, SDXL, FLUX and SD 3.

Each `Family` answers, for a loaded pipeline of its kind:
- which module denoises (`unet`, or `transformer` for FLUX and SD 3),
- the size multiple (the VAE's factor; FLUX packs 2x2 latents, SD 3 patches them),
- whether a task runs classifier-free guidance (then the denoiser sees every image twice),
- how the task's prompt, negative prompt and guidance scale reach the pipeline,
- how one prompt is encoded into the embeddings the pipeline accepts (cached and
  concatenated for batched text2img; see `serve_app.generation.prompts`).

Guidance by family:
- SD 1.x / SDXL / SD 3: classifier-free guidance when `guidance_scale > 1` (SD/SDXL: unless
  the UNet is guidance-distilled, `time_cond_proj_dim`), with the negative prompt.
- FLUX: no classifier-free guidance and no negative prompt. A guidance-distilled transformer
  (FLUX.1 dev: `guidance_embeds` in its config) takes `guidance_scale` as an input embedding;
  one without (schnell) ignores the scale. Decided from the loaded transformer, not the id.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from serve_app.errors import ConfigError
from serve_app.messages import GenerationTask

Embeddings = dict[str, torch.Tensor]


class Family:
    """SD 1.x: the base behaviour the other families adjust."""

    name = "sd"
    denoiser_attr = "unet"
    # Batched text2img keeps each image byte-identical to the same seed made alone.
    batchable = True
    # Sampled by flow matching (FlowMatchEuler), not by a diffusion noise schedule.
    flow_matching = False

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        return int(pipe.vae_scale_factor)

    def classifier_free(self, pipe: DiffusionPipeline, task: GenerationTask) -> bool:
        """The pipelines' own test (`do_classifier_free_guidance`)."""
        return task.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def call_kwargs(self, pipe: DiffusionPipeline, task: GenerationTask) -> dict[str, Any]:
        """Prompt, negative prompt and guidance for a pipeline call on `task`."""
        return {"prompt": task.prompt, "negative_prompt": task.negative_prompt or None,
                "guidance_scale": task.guidance_scale}

    def spatial_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor, width: int,
                        height: int) -> torch.Tensor:
        """The denoising loop's latents as (batch, channels, h, w), for previews."""
        return latents

    def encode(self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str,
               guidance: bool) -> Embeddings:
        """One prompt's embeddings (one row each), as the pipeline's `*_embeds` kwargs."""
        positive, negative = pipe.encode_prompt(
            prompt, pipe._execution_device, 1, guidance, negative_prompt=negative_prompt or None
        )
        return _present(prompt_embeds=positive, negative_prompt_embeds=negative if guidance
                        else None)


class SDXLFamily(Family):
    """Two text encoders (their hidden states concatenated) and a pooled embedding, which
    the UNet takes with the size/crop time ids (the pipeline derives those from the size)."""

    name = "sdxl"

    def encode(self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str,
               guidance: bool) -> Embeddings:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt or None,
        )
        return _present(prompt_embeds=positive, pooled_prompt_embeds=pooled,
                        negative_prompt_embeds=negative if guidance else None,
                        negative_pooled_prompt_embeds=negative_pooled if guidance else None)


class FluxFamily(Family):
    """FLUX.1: a transformer over 2x2-packed latents, CLIP pooled + T5 sequence embeddings,
    no classifier-free guidance (see the module docstring for the guidance scale)."""

    name = "flux"
    denoiser_attr = "transformer"
    flow_matching = True

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        # The pipeline silently rounds other sizes down: refuse them instead.
        return int(pipe.vae_scale_factor) * 2

    def classifier_free(self, pipe: DiffusionPipeline, task: GenerationTask) -> bool:
        return False

    def spatial_latents(self, pipe: DiffusionPipeline, latents: torch.Tensor, width: int,
                        height: int) -> torch.Tensor:
        # FLUX's loop runs on 2x2 patches packed into a sequence: unpack them.
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def call_kwargs(self, pipe: DiffusionPipeline, task: GenerationTask) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt": task.prompt}
        if distilled_guidance(pipe):
            kwargs["guidance_scale"] = task.guidance_scale
        return kwargs

    def encode(self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str,
               guidance: bool) -> Embeddings:
        positive, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1
        )
        return {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}


class SD3Family(Family):
    """SD 3.x: a patch transformer, two CLIPs + T5, classifier-free guidance."""

    name = "sd3"
    denoiser_attr = "transformer"
    flow_matching = True

    def size_multiple(self, pipe: DiffusionPipeline) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)

    def classifier_free(self, pipe: DiffusionPipeline, task: GenerationTask) -> bool:
        return task.guidance_scale > 1

    def encode(self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str,
               guidance: bool) -> Embeddings:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, None, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt or None,
        )
        return _present(prompt_embeds=positive, pooled_prompt_embeds=pooled,
                        negative_prompt_embeds=negative if guidance else None,
                        negative_pooled_prompt_embeds=negative_pooled if guidance else None)


FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SDXLFamily(), FluxFamily(),
                                                    SD3Family())}


def family_of(pipeline: str) -> Family:
    """The family for a registry `pipeline` value."""
    try:
        return FAMILIES[pipeline]
    except KeyError:
        raise ConfigError(f"unknown pipeline family {pipeline!r}; valid: {', '.join(FAMILIES)}"
                          ) from None


def distilled_guidance(pipe: DiffusionPipeline) -> bool:
    """Whether a FLUX transformer takes the guidance scale as an embedding (FLUX.1 dev)."""
    return bool(getattr(pipe.transformer.config, "guidance_embeds", False))


def _present(**tensors: torch.Tensor | None) -> Embeddings:
    return {k: v for k, v in tensors.items() if v is not None}
