"""ENABLE_NSFW_FILTER: the tiny safety checker runs diffusers' real checker path; flagged
images are black and flagged per image, never silently; without the setting no checker."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
from PIL import Image

from serve_app.generation.runner import ModelRunner
from serve_app.generation.safety import NEVER, set_concept_thresholds
from serve_app.jobs.job import JobResult
from serve_app.messages import JobType
from serve_app.settings import Settings
from tests.support.generation import (
    gradient,
    input_image,
    make_task,
    pixels,
    tiny_settings,
    tiny_spec,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory).model_copy(update={"enable_nsfw_filter": True})


@pytest.fixture
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(), settings)


def test_without_the_filter_no_checker_is_loaded_and_no_flags_come_back(
        settings: Settings) -> None:
    off = ModelRunner(tiny_spec(), settings.model_copy(update={"enable_nsfw_filter": False}))
    assert off.pipeline.safety_checker is None
    result = off.generate(make_task(steps=2))
    assert result.nsfw_detected == []
    wire = JobResult(["data:,"], [1], {}, 1, "image/png", result.nsfw_detected).to_wire()
    assert "nsfw" not in wire


def test_an_unflagged_image_is_kept_and_flagged_false(
        settings: Settings, runner: ModelRunner) -> None:
    off = ModelRunner(tiny_spec(), settings.model_copy(update={"enable_nsfw_filter": False}))
    result = runner.generate(make_task(steps=2, num_images=2))
    assert type(runner.pipeline.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert result.nsfw_detected == [False, False]
    assert result.images == off.generate(make_task(steps=2, num_images=2)).images
    wire = JobResult(["a", "b"], [1, 2], {}, 1, "image/png", result.nsfw_detected).to_wire()
    assert wire["nsfw"] == [False, False]


def test_a_forced_flag_blacks_the_image_out_and_says_so(runner: ModelRunner) -> None:
    set_concept_thresholds(runner.pipeline.safety_checker, -1.0)  # every image is "unsafe"
    result = runner.generate(make_task(steps=2))
    assert result.nsfw_detected == [True]
    assert pixels(result.images[0]).max() == 0


def test_a_flagged_inpainting_result_is_not_blended_with_the_input(
        settings: Settings) -> None:
    runner = ModelRunner(tiny_spec("tiny-sd-inpaint", "tiny-inpaint"), settings)
    set_concept_thresholds(runner.pipeline.safety_checker, -1.0)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    task = make_task(mode=JobType.INPAINT, init_image=input_image(gradient(64, 64)),
                     mask_image=input_image(mask), steps=2)
    result = runner.generate(task)
    assert result.nsfw_detected == [True]
    assert pixels(result.images[0]).max() == 0  # outside the mask too: nothing of the input


def concept_scores(runner: ModelRunner, images: list[bytes]) -> np.ndarray:
    """Each image's cosine similarity to each concept, as the checker computes it."""
    pipe = runner.pipeline
    pils = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    clip = pipe.feature_extractor(pils, return_tensors="pt").pixel_values
    checker = pipe.safety_checker
    with torch.inference_mode():
        embeds = checker.visual_projection(checker.vision_model(clip)[1])
        return cosine_distance(embeds, checker.concept_embeds).numpy()


def test_flags_stay_aligned_with_their_images_in_a_batch(runner: ModelRunner) -> None:
    tasks = [make_task(job_id="a", seed=3, num_images=2, steps=2),
             make_task(job_id="b", seed=30, prompt="a quiet harbour", steps=2)]
    clean = runner.generate_batch(tasks)
    images = [img for r in clean for img in r.images]
    assert [r.nsfw_detected for r in clean] == [[False, False], [False]]
    # One concept's threshold between the highest image's similarity and the next: only
    # that image is flagged (scores are rounded to 3 decimals: keep clear of that).
    scores = concept_scores(runner, images)
    concept = int(np.argmax(np.sort(scores, axis=0)[-1] - np.sort(scores, axis=0)[-2]))
    top, second = np.sort(scores[:, concept])[::-1][:2]
    assert top - second > 0.002
    thresholds = [NEVER] * scores.shape[1]
    thresholds[concept] = float(top + second) / 2
    set_concept_thresholds(runner.pipeline.safety_checker, thresholds)
    flagged = int(np.argmax(scores[:, concept]))
    expected = [i == flagged for i in range(3)]

    batched = runner.generate_batch(tasks)
    assert [f for r in batched for f in r.nsfw_detected] == expected
    again = [img for r in batched for img in r.images]
    for i, (before, after) in enumerate(zip(images, again, strict=True)):
        assert (pixels(after).max() == 0) if expected[i] else (after == before)
    alone = [runner.generate(t) for t in tasks]
    assert [f for r in alone for f in r.nsfw_detected] == expected
