"""Sampler names map to the promised diffusers schedulers, and every one of them runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from serve_app.generation.samplers import (
    FLOW_SCHEDULERS,
    SCHEDULERS,
    SamplerFactory,
    make_scheduler,
)
from serve_app.generation.tiny import ensure_tiny_model
from serve_app.messages import SAMPLERS
from serve_app.model_families import FLOW_MATCHING_SAMPLERS, samplers_for
from tests.support.generation import tiny_settings, tiny_spec

EXPECTED_CLASSES = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++_2m": "DPMSolverMultistepScheduler",
    "dpm++_2m_karras": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    settings = tiny_settings(tmp_path_factory)
    spec = tiny_spec()
    folder = ensure_tiny_model(spec.source, spec.weights_path(settings))
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_scheduler_table_covers_exactly_the_wire_samplers() -> None:
    assert tuple(SCHEDULERS) == SAMPLERS
    assert {name: cls.__name__ for name, (cls, _) in SCHEDULERS.items()} == EXPECTED_CLASSES


def test_flow_matching_families_get_exactly_the_registrys_flow_samplers() -> None:
    assert tuple(FLOW_SCHEDULERS) == FLOW_MATCHING_SAMPLERS == samplers_for("flux")
    assert samplers_for("sd3") == FLOW_MATCHING_SAMPLERS and samplers_for("sdxl") == SAMPLERS
    flux_config = {"shift": 3.0, "use_dynamic_shifting": True, "stochastic_sampling": True}
    scheduler = make_scheduler("euler", flux_config, flow_matching=True)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # The model's shift schedule carries over; the sampler's determinism is pinned.
    assert scheduler.config.use_dynamic_shifting and not scheduler.config.stochastic_sampling
    with pytest.raises(ValueError, match=r"valid: euler$"):
        make_scheduler("euler_a", flux_config, flow_matching=True)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_two_steps(pipe: StableDiffusionPipeline, name: str) -> None:
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    steps: list[tuple[int, int]] = []

    def on_step(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps.append((i + 1, p.num_timesteps))
        return tensors

    out = pipe(
        "a red door",
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=on_step,
    )
    assert type(pipe.scheduler).__name__ == EXPECTED_CLASSES[name]
    assert out.images[0].size == (64, 64)
    # Second-order samplers (heun) and PLMS run more timesteps than requested steps.
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1))
    assert len(steps) >= 2 and steps[-1][1] == len(steps)


def test_dpmpp_variants_differ_only_in_karras_sigmas(pipe: StableDiffusionPipeline) -> None:
    plain = make_scheduler("dpm++_2m", pipe.scheduler.config)
    karras = make_scheduler("dpm++_2m_karras", pipe.scheduler.config)
    assert isinstance(plain, DPMSolverMultistepScheduler)
    for sched in (plain, karras):
        assert sched.config.algorithm_type == "dpmsolver++"
        assert sched.config.solver_order == 2
    assert not plain.config.use_karras_sigmas
    assert karras.config.use_karras_sigmas


def test_names_pin_their_algorithm_whatever_the_base_config_says() -> None:
    base = dict(DPMSolverMultistepScheduler(use_karras_sigmas=True).config)
    assert not make_scheduler("euler", base).config.use_karras_sigmas
    assert make_scheduler("plms", base).config.skip_prk_steps
    assert isinstance(make_scheduler("euler_a", base), EulerAncestralDiscreteScheduler)


def test_model_training_settings_carry_over(pipe: StableDiffusionPipeline) -> None:
    sched = make_scheduler("euler", pipe.scheduler.config)
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.beta_end == pytest.approx(0.012)
    assert sched.config.steps_offset == 1


def test_unknown_sampler_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'k_dpm'.*euler_a"):
        make_scheduler("k_dpm", PNDMScheduler().config)


def test_factory_gives_fresh_schedulers_from_a_frozen_base(
    pipe: StableDiffusionPipeline,
) -> None:
    pipe.scheduler = make_scheduler("plms", pipe.scheduler.config)
    factory = SamplerFactory(pipe.scheduler.config)
    first, second = factory.make("euler"), factory.make("euler")
    assert first is not second  # schedulers carry per-run state
    pipe.scheduler = factory.make("ddim")
    assert factory.base_config["_class_name"] == "PNDMScheduler"
    assert type(factory.make("plms")) is PNDMScheduler


def test_get_makes_each_sampler_once_and_make_always_a_fresh_one() -> None:
    factory = SamplerFactory({"num_train_timesteps": 1000})
    assert factory.get("euler_a") is factory.get("euler_a")
    assert factory.get("ddim") is not factory.get("euler_a")
    assert factory.make("euler_a") is not factory.get("euler_a")
