"""The safety checker: diffusers' `StableDiffusionSafetyChecker`, and a tiny seeded one.

With `ENABLE_NSFW_FILTER` a model whose weights include a checker (`safety_checker` +
`feature_extractor` in its `model_index.json`, as SD 1.x ships) loads it, and its pipelines
run it on every image they make: a flagged image is replaced by a black one and flagged in
the result (`result.nsfw`, one boolean per image, never silently). Without the setting the
checker is not loaded at all (`serve_app.generation.pipelines`).

The tiny SD models ship a tiny checker built from a small `CLIPConfig` (seeded like the
rest). How it decides is diffusers' own: for each of its 17 concept embeddings, the cosine
similarity of the image's CLIP embedding with the concept, minus that concept's threshold
(`concept_embeds_weights`), rounded to 3 decimals; any score above 0 flags the image. The
tiny checker's thresholds are 1.0, which no cosine similarity exceeds, so it never flags by
default; setting them lower on the loaded module (`set_concept_thresholds`; -1.0 flags
every image) forces flags, which is how the tests drive it.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from serve_app.generation.batching import invariant_layers

CONCEPTS = 17
SPECIAL_CARE = 3
NEVER = 1.0  # a threshold no cosine similarity exceeds
_WIDTH = 32
_IMAGE_SIZE = 32


def tiny_safety_checker(seed: int) -> StableDiffusionSafetyChecker:
    """A seeded checker over a tiny CLIP vision tower that never flags (see above)."""
    small = {"hidden_size": _WIDTH, "intermediate_size": 37, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=small | {"vocab_size": 64, "max_position_embeddings": 8,
                             "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config=small | {"image_size": _IMAGE_SIZE, "patch_size": 4},
        projection_dim=_WIDTH,
    )
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(CONCEPTS, _WIDTH, generator=generator))
        checker.special_care_embeds.copy_(torch.randn(SPECIAL_CARE, _WIDTH, generator=generator))
    set_concept_thresholds(checker, NEVER)
    return checker


def tiny_feature_extractor() -> CLIPImageProcessor:
    """What turns an image into the tiny checker's input (resize and crop to 32 px)."""
    return CLIPImageProcessor(size={"shortest_edge": _IMAGE_SIZE},
                              crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})


def set_concept_thresholds(checker: StableDiffusionSafetyChecker,
                           thresholds: float | list[float]) -> None:
    """Set the concept thresholds (one for all, or one per concept) and keep the special-care
    ones at `NEVER`, so each concept decides alone (see the module docstring)."""
    values = torch.as_tensor(thresholds, dtype=checker.concept_embeds_weights.dtype)
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(values.expand(CONCEPTS))
        checker.special_care_embeds_weights.fill_(NEVER)


def prepare_checker(pipe: DiffusionPipeline, batch_invariant_on_cpu: bool) -> None:
    """Make a loaded checker batch-invariant like the denoiser, so an image in a batch gets
    the decision it gets alone (its CLIP tower's linear layers are GEMMs over the batch)."""
    checker = getattr(pipe, "safety_checker", None)
    if checker is not None and batch_invariant_on_cpu:
        invariant_layers(checker)
