"""The other pipeline families on their tiny seeded models: SDXL (two text encoders, pooled
embeddings, time ids, SDXL inpainting), FLUX.1 (flow matching, distilled guidance) and SD 3.
Every mode at the requested size, batches byte-identical to lone runs, guidance as each
family means it, samplers and sizes a family cannot take refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import (
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from serve_app.errors import InvalidRequest
from serve_app.generation.runner import ModelRunner
from serve_app.generation.tiny import build_flux_pipeline
from serve_app.messages import GenerationTask, JobType, UpscalerRef
from serve_app.registry import ModelSpec
from serve_app.settings import Settings
from tests.support.generation import (
    gradient,
    input_image,
    make_task,
    pixels,
    tiny_settings,
    tiny_spec,
)

STEPS = 2


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-sdxl", "tiny-sdxl"), settings)


@pytest.fixture(scope="module")
def flux(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-flux", "tiny-flux"), settings)


@pytest.fixture(scope="module")
def sd3(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-sd3", "tiny-sd3"), settings)


def task(runner: ModelRunner, **fields: object) -> GenerationTask:
    return make_task(sampler=runner.spec.defaults.sampler, steps=STEPS, **fields)


def masked(width: int = 64, height: int = 64) -> tuple[Image.Image, np.ndarray]:
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask, "L"), mask == 255


def run_modes(runner: ModelRunner, modes: list[JobType], width: int, height: int) -> dict:
    """One job per mode at `width` x `height`: the decoded pixels of each."""
    image = gradient(width, height)
    mask, _ = masked(width, height)
    fields = {
        JobType.TEXT2IMG: {},
        JobType.IMG2IMG: {"init_image": input_image(gradient(80, 80)), "strength": 0.7},
        JobType.INPAINT: {"init_image": input_image(image), "mask_image": input_image(mask)},
        JobType.STYLE_TRANSFER: {"init_image": input_image(image), "style_strength": 0.8,
                                 "style_image": input_image(Image.new("RGB", (32, 32), "red")),
                                 "content_strength": 0.3},
        # The input plus 16 px left and right, 8 px top and bottom: the requested size.
        JobType.OUTPAINT: {"init_image": input_image(gradient(width - 32, height - 16)),
                           "outpaint": (16, 8, 16, 8, 4)},
        JobType.UPSCALE: {"init_image": input_image(gradient(width // 2, height // 2)),
                          "upscaler": UpscalerRef("lanczos")},
    }
    return {mode: pixels(runner.generate(task(runner, mode=mode, width=width, height=height,
                                              **fields[mode])).images[0]) for mode in modes}


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_jobs_batched_into_one_call_equal_each_made_alone(
    family: str, request: pytest.FixtureRequest,
) -> None:
    # SDXL: pooled embeddings and time ids per image too; FLUX: T5 + pooled CLIP, no
    # guidance pass; SD 3: three encoders and classifier-free guidance.
    runner: ModelRunner = request.getfixturevalue(family)
    tasks = [task(runner, job_id="a", prompt="a red barn", seed=3),
             task(runner, job_id="b", prompt="a blue sea", seed=9, num_images=2,
                  negative_prompt="blurry"),
             task(runner, job_id="c", prompt="a red barn", seed=11)]
    assert runner.batchable
    batched = runner.generate_batch(tasks)
    alone = [runner.generate(t) for t in tasks]
    assert [r.seeds for r in batched] == [[3], [9, 10], [11]]
    assert [r.images for r in batched] == [r.images for r in alone]
    assert len({img for r in batched for img in r.images}) == 4


# -- SDXL -------------------------------------------------------------------------------


def test_tiny_sdxl_is_sdxl_shaped_and_inpaints_on_the_sdxl_inpainting_pipeline(
    sdxl: ModelRunner,
) -> None:
    pipe = sdxl.pipeline
    assert type(pipe).__name__ == StableDiffusionXLPipeline.__name__
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)
    assert isinstance(sdxl._modes.pipes.inpaint(), StableDiffusionXLInpaintPipeline)


def test_every_mode_runs_on_sdxl_at_the_requested_size(sdxl: ModelRunner) -> None:
    out = run_modes(sdxl, list(JobType), 64, 64)
    assert {mode: image.shape for mode, image in out.items()} == dict.fromkeys(JobType,
                                                                              (64, 64, 3))
    _, inside = masked()
    source = np.asarray(gradient(64, 64), dtype=np.int16)
    inpainted = out[JobType.INPAINT]
    assert np.array_equal(inpainted[~inside], source[~inside])
    assert np.abs(inpainted[inside] - source[inside]).mean() > 10
    wide = sdxl.generate(task(sdxl, width=96, height=64))
    assert pixels(wide.images[0]).shape == (64, 96, 3)


# -- FLUX -------------------------------------------------------------------------------


def test_tiny_flux_is_a_guidance_distilled_flux_pipeline(flux: ModelRunner) -> None:
    pipe = flux.pipeline
    assert type(pipe).__name__ == FluxPipeline.__name__
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.guidance_embeds is True
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert isinstance(flux._modes.pipes.inpaint(), FluxInpaintPipeline)


def test_flux_text2img_img2img_and_inpainting_make_the_requested_size(flux: ModelRunner) -> None:
    out = run_modes(flux, [JobType.TEXT2IMG, JobType.IMG2IMG, JobType.INPAINT], 96, 64)
    assert {m: image.shape for m, image in out.items()} == {
        JobType.TEXT2IMG: (64, 96, 3), JobType.IMG2IMG: (64, 96, 3),
        JobType.INPAINT: (64, 96, 3)}
    assert len({image.tobytes() for image in out.values()}) == 3


def test_flux_dev_takes_the_guidance_scale_as_an_input_and_no_negative_prompt(
    flux: ModelRunner,
) -> None:
    calls: list[int] = []
    denoiser = flux._modes.pipes.denoiser
    inner = denoiser._forward
    denoiser._forward = lambda *a, **k: calls.append(len(k["hidden_states"])) or inner(*a, **k)
    try:
        base = flux.generate(task(flux, guidance_scale=3.5)).images
        assert calls == [1] * STEPS  # one image, one forward a step: no classifier-free pass
    finally:
        denoiser._forward = inner
    assert flux.generate(task(flux, guidance_scale=1.0)).images != base
    assert flux.generate(task(flux, guidance_scale=3.5, negative_prompt="blurry")).images == base


def test_flux_schnell_ignores_the_guidance_scale(settings: Settings, tmp_path: Path) -> None:
    # Decided from the loaded transformer (no guidance embedding), not from the model id.
    folder = tmp_path / "schnell-like"
    build_flux_pipeline(tmp_path / "tok", guidance_embeds=False).save_pretrained(folder)
    spec = ModelSpec(id="flux-dev", name="x", description="d", pipeline="flux",
                     path=str(folder))
    schnell = ModelRunner(spec, settings)
    assert schnell.pipeline.transformer.config.guidance_embeds is False
    images = {g: schnell.generate(task(schnell, guidance_scale=g)).images[0] for g in (0, 7)}
    assert images[0] == images[7]


def test_flux_refuses_samplers_and_sizes_flow_matching_cannot_take(flux: ModelRunner) -> None:
    with pytest.raises(InvalidRequest, match=r"'euler_a' does not apply .*valid samplers: euler$"):
        flux.generate(make_task(sampler="euler_a"))
    with pytest.raises(InvalidRequest, match="multiples of 16"):
        flux.generate(task(flux, width=72))


# -- SD 3 -------------------------------------------------------------------------------


def test_sd3_runs_text2img_and_img2img_with_classifier_free_guidance(sd3: ModelRunner) -> None:
    assert type(sd3.pipeline).__name__ == StableDiffusion3Pipeline.__name__
    out = run_modes(sd3, [JobType.TEXT2IMG, JobType.IMG2IMG], 64, 64)  # guidance 7.5
    assert [image.shape for image in out.values()] == [(64, 64, 3)] * 2
    plain = pixels(sd3.generate(task(sd3, guidance_scale=1.0)).images[0])
    negative = pixels(sd3.generate(task(sd3, negative_prompt="blurry")).images[0])
    guided = out[JobType.TEXT2IMG]
    assert not np.array_equal(plain, guided) and not np.array_equal(negative, guided)


@pytest.mark.parametrize("source", ["tiny-sdxl", "tiny-flux"])
def test_a_fresh_build_loaded_again_makes_the_same_images(
    settings: Settings, tmp_path: Path, source: str, request: pytest.FixtureRequest,
) -> None:
    shipped: ModelRunner = request.getfixturevalue(source.removeprefix("tiny-"))
    elsewhere = Settings(cache_dir=str(tmp_path / "models"), data_dir=str(tmp_path / "data"),
                         model_path=settings.model_path)
    fresh = ModelRunner(tiny_spec(source, source), elsewhere)
    one = task(fresh, seed=5, num_images=2)
    assert fresh.generate(one).images == shipped.generate(one).images


def test_the_registry_knows_each_familys_size_multiple_without_torch(
    sdxl: ModelRunner, flux: ModelRunner, sd3: ModelRunner,
) -> None:
    for runner in (sdxl, flux, sd3):
        family = runner._modes.family
        assert runner.spec.size_multiple == family.size_multiple(runner.pipeline), family.name


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_each_family_shows_latent_thumbnails_at_the_image_shape(
    family: str, request: pytest.FixtureRequest
) -> None:
    """16-channel latents (FLUX: packed 2x2 into a sequence) preview like SD's 4."""
    import io

    runner: ModelRunner = request.getfixturevalue(family)
    got: list[tuple[int, dict[str, bytes]]] = []
    runner.generate(task(runner, width=128, height=64, preview_every=1),
                    on_preview=lambda step, total, th: got.append((step, th)))
    assert [step for step, _ in got] == [1]
    assert Image.open(io.BytesIO(got[0][1]["job-1"])).size == (128, 64)
