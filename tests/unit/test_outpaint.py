"""Outpainting's canvas, mask and composite, and outpaint and upscale tasks through the
ModelRunner on the tiny seeded models: padded size, the input's pixels exactly outside the
new area and seam, progress and stopping per upscale tile."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve_app.generation import outpaint
from serve_app.generation.runner import Interrupted, ModelRunner
from serve_app.messages import JobType, UpscalerRef
from serve_app.settings import Settings
from tests.support.generation import (
    input_image,
    make_task,
    noise,
    pixels,
    tiny_settings,
    tiny_spec,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def inpaint_runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec("tiny-sd-inpaint", "tiny-inpaint"), settings)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(), settings)


def test_canvas_keeps_the_image_and_extends_its_edges() -> None:
    image = noise(40, 24)
    canvas = outpaint.prepare(image, (8, 4, 0, 12), seam=0)
    out = np.asarray(canvas.image)
    assert canvas.image.size == (48, 40)
    assert np.array_equal(out[4:28, 8:48], np.asarray(image))
    assert canvas.mask.getextrema() == (0, 255)
    mask = np.asarray(canvas.mask)
    assert mask[4:28, 8:48].max() == 0 and mask[:4].min() == 255 and mask[28:].min() == 255


def test_seam_band_is_masked_and_feathered_only_on_extended_sides() -> None:
    canvas = outpaint.prepare(noise(40, 40), (16, 0, 0, 0), seam=4)
    alpha = canvas.alpha
    row = alpha[20]
    assert row[:16].tolist() == [1.0] * 16
    assert np.allclose(row[16:20], [0.8, 0.6, 0.4, 0.2])
    assert row[20:].max() == 0
    assert alpha[0, 20:].max() == 0  # top was not extended: no seam there
    assert (np.asarray(canvas.mask) == 255).sum() == (alpha > 0).sum()


def test_composite_is_exactly_the_canvas_where_alpha_is_zero() -> None:
    canvas = outpaint.prepare(noise(32, 32), (8, 8, 8, 8), seam=4)
    generated = Image.new("RGB", canvas.image.size, "white")
    out = np.asarray(outpaint.composite(generated, canvas))
    keep = canvas.alpha == 0
    assert np.array_equal(out[keep], np.asarray(canvas.image)[keep])
    assert (out[canvas.alpha == 1] == 255).all()


@pytest.mark.parametrize("model", ["inpaint_runner", "runner"])
def test_outpaint_64_each_side_pads_and_keeps_the_original_outside_the_seam(
        request: pytest.FixtureRequest, model: str) -> None:
    """On the 9-channel inpainting model and in legacy mode on the base model."""
    run: ModelRunner = request.getfixturevalue(model)
    image = noise(64, 48, seed=3)
    seam = 8
    task = make_task(mode=JobType.OUTPAINT, width=192, height=176, steps=2,
                     init_image=input_image(image), outpaint=(64, 64, 64, 64, seam))
    result = run.generate(task)
    out = pixels(result.images[0])
    assert out.shape == (176, 192, 3)
    inner = out[64 + seam:64 + 48 - seam, 64 + seam:64 + 64 - seam]
    assert np.array_equal(inner, np.asarray(image, np.int16)[seam:-seam, seam:-seam])
    assert not np.array_equal(out[:64], np.zeros_like(out[:64]))  # something was painted


def test_upscale_task_through_the_runner_makes_the_size_and_reports_tiles(
        runner: ModelRunner) -> None:
    ticks: list[tuple[int, int]] = []
    ref = UpscalerRef("tiny-esrgan", "tiny-esrgan", tile=32, tile_overlap=8)
    task = make_task(mode=JobType.UPSCALE, width=160, height=96, steps=1,
                     init_image=input_image(noise(80, 48)), upscaler=ref)
    result = runner.generate(task, on_step=lambda s, t: ticks.append((s, t)))
    assert pixels(result.images[0]).shape == (96, 160, 3)
    assert ticks == [(i, 6) for i in range(1, 7)]  # 3 x 2 tiles of at most 32 px


def test_lanczos_upscale_task_is_pils_resize(runner: ModelRunner) -> None:
    image = noise(40, 30)
    task = make_task(mode=JobType.UPSCALE, width=100, height=75, steps=1,
                     init_image=input_image(image), upscaler=UpscalerRef("lanczos"))
    out = pixels(runner.generate(task).images[0])
    expected = np.asarray(image.resize((100, 75), Image.Resampling.LANCZOS), np.int16)
    assert np.array_equal(out, expected)


def test_an_upscale_stops_between_tiles(runner: ModelRunner) -> None:
    ticks: list[int] = []
    ref = UpscalerRef("tiny-esrgan", "tiny-esrgan", tile=32, tile_overlap=8)
    task = make_task(mode=JobType.UPSCALE, width=160, height=96, steps=1,
                     init_image=input_image(noise(80, 48)), upscaler=ref)
    with pytest.raises(Interrupted):
        runner.generate(task, on_step=lambda s, t: ticks.append(s),
                        should_stop=lambda: len(ticks) >= 2)
    assert ticks == [1, 2]
