"""The hires fix on the tiny seeded models (`serve_app.generation.hires`): the final size,
the same seed the same bytes, a batch equal to lone jobs, one progress count across both
passes, stopping in the second pass, and the second pass starting from the first."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.generation.hires import (
    HIRES_PHASE,
    image_upscaler,
    upscale_image,
    upscale_latents,
)
from serve_app.generation.runner import Interrupted, ModelRunner
from serve_app.hires_plan import UPSCALERS
from serve_app.messages import GenerationTask, HiresFix
from serve_app.settings import Settings
from tests.support.generation import make_task, pixels, tiny_settings, tiny_spec


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(), settings)


def hires(width: int = 128, height: int = 128, upscaler: str = "latent", steps: int = 4,
          strength: float = 0.5, sampler: str = "euler_a") -> HiresFix:
    return HiresFix(width, height, upscaler, steps, strength, sampler)


def task(fix: HiresFix | None = None, **fields: object) -> GenerationTask:
    return make_task(steps=3, hires=fix if fix is not None else hires(), **fields)


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("upscaler", UPSCALERS)
def test_every_upscaler_makes_the_image_at_twice_the_size(runner: ModelRunner,
                                                          upscaler: str) -> None:
    result = runner.generate(task(hires(upscaler=upscaler), num_images=2))
    assert [size(img) for img in result.images] == [(128, 128), (128, 128)]


@pytest.mark.parametrize("upscaler", ["latent-bicubic", "nearest"])
def test_a_9_channel_inpainting_model_runs_both_passes_on_its_inpainting_route(
        settings: Settings, upscaler: str) -> None:
    inpainting = ModelRunner(tiny_spec("tiny-sd-inpaint", "tiny-inpaint"), settings)
    made = inpainting.generate(task(hires(upscaler=upscaler), num_images=2))
    assert [size(img) for img in made.images] == [(128, 128)] * 2
    assert made.images[0] != made.images[1]
    assert inpainting.generate(task(hires(upscaler=upscaler), num_images=2)).images == \
        made.images


def test_another_aspect_is_covered_and_centre_cropped(runner: ModelRunner) -> None:
    for upscaler in ("latent", "lanczos"):
        result = runner.generate(task(hires(width=160, height=96, upscaler=upscaler)))
        assert size(result.images[0]) == (160, 96)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(
        runner: ModelRunner) -> None:
    first = runner.generate(task(seed=5)).images
    assert runner.generate(task(seed=5)).images == first
    assert runner.generate(task(seed=6)).images != first


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_a_batch_equals_each_job_made_alone_byte_for_byte(runner: ModelRunner,
                                                          upscaler: str) -> None:
    fix = hires(upscaler=upscaler)
    tasks = [task(fix, job_id="a", prompt="a red barn", seed=3),
             task(fix, job_id="b", prompt="a blue sea", seed=9, num_images=2,
                  negative_prompt="blurry"),
             task(fix, job_id="c", prompt="a red barn", seed=11)]
    steps: list[tuple[int, ...]] = []
    batched = runner.generate_batch(tasks, on_step=lambda *a: steps.append(a))
    alone = [runner.generate(t) for t in tasks]
    assert [r.seeds for r in batched] == [[3], [9, 10], [11]]
    assert [r.images for r in batched] == [r.images for r in alone]
    assert len({img for r in batched for img in r.images}) == 4
    assert steps[-1] == (5, 5, HIRES_PHASE)  # one count for the batch, both passes


@pytest.fixture(scope="module")
def flux(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-flux", "tiny-flux"), settings)


def test_a_batch_on_another_family_equals_lone_jobs(flux: ModelRunner) -> None:
    fix = hires(width=96, height=64, sampler="euler")
    tasks = [make_task(job_id=str(i), seed=i, steps=2, sampler="euler", hires=fix,
                       prompt=f"p{i}") for i in range(3)]
    batched = flux.generate_batch(tasks)
    assert [r.images for r in batched] == [flux.generate(t).images for t in tasks]
    assert size(batched[0].images[0]) == (96, 64)


def test_progress_counts_both_passes_and_names_the_second(runner: ModelRunner) -> None:
    # 3 first-pass steps, then int(8 x 0.5) = 4 second-pass ones: 7 in all from the start.
    steps: list[tuple[int, ...]] = []
    runner.generate(task(hires(steps=8, strength=0.5)), on_step=lambda *a: steps.append(a))
    assert steps == [(1, 7), (2, 7), (3, 7), (4, 7, "hires"), (5, 7, "hires"),
                     (6, 7, "hires"), (7, 7, "hires")]


@pytest.mark.parametrize(("model_id", "source"), [("tiny-sdxl", "tiny-sdxl"),
                                                  ("tiny-sd3", "tiny-sd3")])
def test_sdxl_and_sd3_refine_their_scaled_latents_on_their_img2img_pipelines(
        settings: Settings, model_id: str, source: str) -> None:
    model = ModelRunner(tiny_spec(model_id, source), settings)
    sampler = model.spec.defaults.sampler
    fixed = task(hires(width=96, height=64, sampler=sampler), sampler=sampler, width=64,
                 height=32)
    made = model.generate(fixed)
    assert size(made.images[0]) == (96, 64)
    assert model.generate(fixed).images == made.images


@pytest.mark.parametrize("family", ["runner", "flux"])
def test_previews_come_from_both_passes_the_second_named(
        family: str, request: pytest.FixtureRequest) -> None:
    # FLUX packs its latents: the second pass's thumbnails unpack them at the hires size.
    model: ModelRunner = request.getfixturevalue(family)
    sampler = model.spec.defaults.sampler
    fix = hires(width=96, height=64, steps=4, strength=0.5, sampler=sampler)
    shown: list[tuple[object, ...]] = []
    model.generate(make_task(steps=2, width=64, height=32, sampler=sampler, hires=fix,
                             preview_every=1),
                   on_preview=lambda *a: shown.append((a[0], a[1], *a[2], *a[3:])))
    # None at a pass's last step (the image itself follows), as in a one-pass job.
    assert shown == [(1, 4, "job-1"), (3, 4, "job-1", "hires")]


def test_stopping_in_the_second_pass_stops_it_there(runner: ModelRunner) -> None:
    steps: list[tuple[int, ...]] = []
    stop = lambda: any(HIRES_PHASE in s for s in steps)  # noqa: E731
    with pytest.raises(Interrupted, match="stopped after 1 step"):
        runner.generate(task(hires(steps=8, strength=0.5)), on_step=lambda *a: steps.append(a),
                        should_stop=stop)
    assert steps[-1] == (4, 7, "hires")  # the first second-pass step, and no other


def test_stopping_in_the_first_pass_never_starts_the_second(runner: ModelRunner) -> None:
    steps: list[tuple[int, ...]] = []
    with pytest.raises(Interrupted):
        runner.generate(task(), on_step=lambda *a: steps.append(a),
                        should_stop=lambda: len(steps) >= 2)
    assert steps == [(1, 5), (2, 5)]


def test_the_second_pass_refines_the_first_pass_image_upscaled(runner: ModelRunner) -> None:
    # A spy upscaler (plugged in by name, as a model upscaler would be) sees exactly the
    # image a plain text2img makes with the same seed, and what it returns is refined.
    seen: list[np.ndarray] = []

    def spy(image: Image.Image, width: int, height: int) -> Image.Image:
        seen.append(np.asarray(image))
        return image.resize((width, height), Image.Resampling.BICUBIC)

    runner._loaded().image_upscalers["spy"] = spy
    try:
        made = runner.generate(task(hires(upscaler="spy"), seed=4, num_images=2))
    finally:
        del runner._loaded().image_upscalers["spy"]
    plain = runner.generate(make_task(seed=4, steps=3, num_images=2))
    assert [a.tolist() for a in seen] == [pixels(img).tolist() for img in plain.images]
    assert [size(img) for img in made.images] == [(128, 128)] * 2


def test_latent_upscalers_interpolate_and_crop_like_a1111() -> None:
    latents = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    nearest = upscale_latents(latents, hires(32, 32, "latent-nearest"), (16, 16), 8)
    assert torch.equal(nearest, latents.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # 16x16 to 32x16: covered at 4x4 latent pixels, one row cropped from top and bottom.
    cropped = upscale_latents(latents, hires(32, 16, "latent-nearest"), (16, 16), 8)
    assert torch.equal(cropped, nearest[:, :, 1:3, :])
    bilinear = upscale_latents(latents, hires(32, 32, "latent"), (16, 16), 8)
    assert bilinear.shape == (2, 4, 4, 4) and not torch.equal(bilinear, nearest)


def test_image_upscalers_plug_in_by_name() -> None:
    calls: list[tuple[int, int]] = []

    def model(image: Image.Image, width: int, height: int) -> Image.Image:
        calls.append((width, height))
        return Image.new("RGB", (width, height), "red")

    picture = Image.new("RGB", (64, 48), "blue")
    fix = hires(128, 128, "esrgan-test")
    made = upscale_image(picture, fix, image_upscaler("esrgan-test", {"esrgan-test": model}))
    assert calls == [(171, 128)] and made.size == (128, 128)
    assert made.getpixel((0, 0)) == (255, 0, 0)
    lanczos = upscale_image(picture, hires(128, 96, "lanczos"), image_upscaler("lanczos"))
    assert lanczos.size == (128, 96) and lanczos.getpixel((5, 5)) == (0, 0, 255)
