"""ControlNet jobs on the tiny seeded models: canny preprocessing, text2img and img2img
steered by a control image, sizes as asked, several images each equal to alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from serve_app.errors import InvalidRequest
from serve_app.generation.batching import BatchInvariantDenoiser
from serve_app.generation.controlnets import canny, control_image
from serve_app.generation.runner import ModelRunner
from serve_app.messages import ControlInput, JobType
from serve_app.settings import Settings
from tests.support.generation import (
    gradient,
    input_image,
    make_task,
    pixels,
    tiny_settings,
    tiny_spec,
)

NETS = [{"id": "edges", "source": "tiny-controlnet", "seed": 1}]


def disc(size: int = 64) -> Image.Image:
    """A white disc on black: its only edge is the circle."""
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).ellipse((16, 16, size - 17, size - 17), fill="white")
    return image


def control(scale: float = 1.0, preprocess: str = "canny") -> ControlInput:
    return ControlInput(model="edges", image=input_image(disc()), conditioning_scale=scale,
                        preprocess=preprocess)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tmp_path_factory)


@pytest.fixture(scope="module")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner(tiny_spec(control_nets=NETS), settings)


def test_canny_keeps_the_size_and_marks_only_the_edges() -> None:
    edges = np.asarray(canny(disc()))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[:, :, 0] == edges[:, :, 2]).all()
    assert edges[32, 32, 0] == 0 and edges[0, 0, 0] == 0  # inside and outside the disc
    assert edges[32, 14:19, 0].max() == 255  # the circle's left edge, on row 32


def test_the_control_image_is_fitted_to_the_output_size_before_preprocessing() -> None:
    as_is = control_image(control(preprocess="none"), 96, 48)
    assert as_is.size == (96, 48) and np.asarray(as_is).max() == 255
    edges = np.asarray(control_image(control(), 96, 48))
    assert edges.shape == (48, 96, 3) and set(np.unique(edges)) == {0, 255}


def test_a_controlnet_job_makes_the_requested_size_and_follows_its_scale(
        runner: ModelRunner) -> None:
    plain = runner.generate(make_task(width=64, height=48, steps=3))
    steered = runner.generate(make_task(width=64, height=48, steps=3, control=control()))
    assert pixels(steered.images[0]).shape == (48, 64, 3)
    assert steered.images != plain.images
    # Scale 0 adds nothing to the UNet: the plain pipeline's image, byte for byte.
    off = runner.generate(make_task(width=64, height=48, steps=3, control=control(0.0)))
    assert off.images == plain.images


def test_several_images_of_a_controlnet_job_equal_the_same_seeds_alone(
        runner: ModelRunner) -> None:
    task = make_task(steps=3, num_images=2, seed=9, control=control())
    assert task.batch_key() is None  # never shares a call with other jobs
    together = runner.generate(task).images
    alone = [runner.generate(dataclasses.replace(task, num_images=1, seed=s)).images[0]
             for s in (9, 10)]
    assert together == alone and together[0] != together[1]


def test_img2img_takes_a_controlnet(runner: ModelRunner) -> None:
    task = make_task(mode=JobType.IMG2IMG, init_image=input_image(gradient(64, 64)),
                     strength=0.6, steps=4)
    plain = runner.generate(task)
    steered = runner.generate(dataclasses.replace(task, control=control()))
    assert pixels(steered.images[0]).shape == (64, 64, 3)
    assert steered.images != plain.images


def test_split_controlnet_outputs_are_reassembled_per_image(runner: ModelRunner) -> None:
    """The GPU path (per-image sub-batches of the net's forward), run here on the CPU."""
    pipe = runner._loaded().controls.pipeline("edges", JobType.TEXT2IMG)
    wrapper = BatchInvariantDenoiser(type(pipe.controlnet).from_config(pipe.controlnet.config),
                                     on_cpu=False)
    wrapper.blocks = 2
    net = wrapper.model.eval()
    sample = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    text = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        down, mid = net(sample, 10, encoder_hidden_states=text, controlnet_cond=cond,
                        return_dict=False)
        # [uncond_0, uncond_1, cond_0, cond_1]: image i's pair is rows (i, i + 2).
        pair = torch.tensor([1, 3])
        down_1, mid_1 = wrapper._forward(sample[pair], 10, encoder_hidden_states=text[pair],
                                         controlnet_cond=cond[pair], return_dict=False)
    assert len(down) == len(down_1)
    assert torch.equal(mid[pair], mid_1)
    assert all(torch.equal(d[pair], d1) for d, d1 in zip(down, down_1, strict=True))


def test_sdxl_runs_its_controlnet(settings: Settings) -> None:
    runner = ModelRunner(tiny_spec("tiny-sdxl", "tiny-sdxl", control_nets=NETS), settings)
    task = make_task(sampler="euler", steps=2, width=64, height=48, guidance_scale=5.0)
    plain = runner.generate(task)
    steered = runner.generate(dataclasses.replace(task, control=control()))
    assert pixels(steered.images[0]).shape == (48, 64, 3)
    assert steered.images != plain.images


def test_a_controlnet_the_model_does_not_list_is_refused(runner: ModelRunner) -> None:
    other = dataclasses.replace(control(), model="depth")
    with pytest.raises(InvalidRequest, match=r"unknown ControlNet 'depth'.*edges"):
        runner.generate(make_task(control=other))
