"""Latent thumbnails (`preview: true`): the projection is fitted to the model's own VAE, the
thumbnails come at the steps asked for, at the image's shape, seeded like the images, and a
job's thumbnail is the same made in a batch or alone."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from serve_app.generation.previews import THUMBNAIL_SIDE, Projection
from serve_app.generation.runner import ModelRunner
from serve_app.settings import Settings
from tests.support.generation import make_task, tiny_settings, tiny_spec

Thumbnails = list[tuple[int, int, dict[str, bytes]]]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    settings: Settings = tiny_settings(tmp_path_factory)
    return ModelRunner(tiny_spec(), settings)


class LinearVAE(torch.nn.Module):
    """A VAE whose decoder is exactly affine per latent pixel, upsampled 8x."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weights, self.bias = weights, bias  # (3, channels), (3,)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.config = SimpleNamespace(latent_channels=weights.shape[1], scaling_factor=0.5,
                                      shift_factor=0.25, force_upcast=False)

    def decode(self, x: torch.Tensor) -> SimpleNamespace:
        rgb = torch.einsum("bchw,rc->brhw", x, self.weights) + self.bias[None, :, None, None]
        return SimpleNamespace(sample=rgb.repeat_interleave(8, 2).repeat_interleave(8, 3))


def test_the_projection_recovers_an_affine_decoder_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    weights, bias = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    vae = LinearVAE(weights, bias)
    projection = Projection.fit(SimpleNamespace(vae=vae))  # type: ignore[arg-type]
    assert projection is not None
    # The pipelines decode latents / scaling + shift: the fit is in the loop's own units.
    torch.testing.assert_close(projection.weights, weights.T / 0.5, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(projection.bias, weights @ torch.full((16,), 0.25) + bias,
                               atol=1e-4, rtol=1e-4)


def test_a_decoder_that_overflows_turns_previews_off() -> None:
    vae = LinearVAE(torch.full((3, 4), float("inf")), torch.zeros(3))
    assert Projection.fit(SimpleNamespace(vae=vae)) is None  # type: ignore[arg-type]


def run(runner: ModelRunner, **fields: object) -> tuple[bytes, Thumbnails]:
    got: Thumbnails = []
    task = make_task(sampler="euler", **fields)
    result = runner.generate(task, on_preview=lambda s, t, th: got.append((s, t, th)))
    return result.images[0], got


def test_thumbnails_come_every_n_steps_but_not_after_the_last(runner: ModelRunner) -> None:
    _, got = run(runner, steps=6, preview_every=2)
    assert [(step, total, list(th)) for step, total, th in got] == [
        (2, 6, ["job-1"]), (4, 6, ["job-1"])]
    picture = Image.open(io.BytesIO(got[0][2]["job-1"]))
    assert (picture.format, picture.size) == ("JPEG", (64, 64))


def test_a_thumbnail_keeps_the_image_shape_within_its_size_limit(runner: ModelRunner) -> None:
    _, got = run(runner, steps=2, preview_every=1, width=256, height=128)
    size = Image.open(io.BytesIO(got[0][2]["job-1"])).size
    assert size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)


def test_thumbnails_are_seeded_like_the_images(runner: ModelRunner) -> None:
    _, first = run(runner, steps=3, preview_every=1, seed=5)
    _, again = run(runner, steps=3, preview_every=1, seed=5)
    _, other = run(runner, steps=3, preview_every=1, seed=6)
    assert first == again
    assert first[0][2]["job-1"] != other[0][2]["job-1"]


def test_no_thumbnails_unless_asked_and_the_image_is_the_same(runner: ModelRunner) -> None:
    plain, none = run(runner, steps=3)
    previewed, some = run(runner, steps=3, preview_every=1)
    assert none == [] and len(some) == 2
    assert plain == previewed  # watching the image form does not change it


def test_a_jobs_thumbnails_are_the_same_batched_or_alone(runner: ModelRunner) -> None:
    tasks = [
        make_task(job_id="a", seed=3, sampler="euler", preview_every=1),
        make_task(job_id="b", seed=9, num_images=2, sampler="euler"),
        make_task(job_id="c", seed=11, sampler="euler", preview_every=2),
    ]
    batched: Thumbnails = []
    runner.generate_batch(tasks, on_preview=lambda s, t, th: batched.append((s, t, th)))
    assert [(s, sorted(th)) for s, _, th in batched] == [(1, ["a"]), (2, ["a", "c"]),
                                                         (3, ["a"])]
    for task in (tasks[0], tasks[2]):
        alone: Thumbnails = []
        runner.generate(task, on_preview=lambda s, t, th, got=alone: got.append((s, t, th)))
        assert [th[task.job_id] for _, _, th in alone] == [
            th[task.job_id] for _, _, th in batched if task.job_id in th]


def test_a_vae_no_linear_map_reads_gets_previews_decoded_by_itself() -> None:
    """The trained tiny-sd's VAE (attention in its middle block) draws colours no linear map
    of its latents gives: a red square was previewed green. Its previews are decoded."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from serve_app.generation.previews import LINEAR_R2, DecodedPreview, Previewer
    from serve_app.training import judge, world
    from serve_app.training.data import to_tensor

    pipe = StableDiffusionPipeline.from_pretrained(
        Path(__file__).parents[2] / "serve_app" / "trained" / "tiny-sd")
    fitted = Projection.fit(pipe)
    assert fitted is not None and fitted.r2 < LINEAR_R2
    previewer = Previewer()
    assert isinstance(previewer.projection(pipe), DecodedPreview)
    scene = world.Scene("square", "red", "blue", "left", "large")
    with torch.no_grad():
        latent = pipe.vae.encode(to_tensor([world.render(scene)])).latent_dist.mode()[0]
    shown = previewer.projection(pipe).thumbnail(  # type: ignore[union-attr]
        latent * pipe.vae.config.scaling_factor, 64, 64)
    verdict = judge.judge(Image.open(io.BytesIO(shown)))
    assert (verdict.background, verdict.colour, verdict.position) == ("blue", "red", "left")
