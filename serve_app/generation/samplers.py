"""Sampler names (the wire's `sampler`) -> diffusers schedulers, per pipeline family.

`SCHEDULERS` holds exactly the names of `serve_app.messages.SAMPLERS`, for the diffusion
(SD 1.x / SDXL) families; `FLOW_SCHEDULERS` the names flow-matching families (FLUX, SD 3)
accept, `serve_app.model_families.FLOW_MATCHING_SAMPLERS` (tests keep both in step). Which names a
model accepts is the registry's (torch-free) answer, so the ingress refuses the others.

A scheduler is derived from the model's own scheduler config with
`Cls.from_config(base_config, **kwargs)`, so what the model was trained with (beta
schedule, prediction type, timestep spacing) carries over, while the kwargs pin what the
sampler name promises: a name means the same algorithm whatever the model ships with.

Schedulers are stateful (`set_timesteps`), so every pipeline call gets a fresh instance;
`SamplerFactory` keeps the base config per pipeline so that costs well under a millisecond.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# A base config may carry a Karras/exponential/beta sigma schedule (a model that ships with
# DPM++ Karras, say): plain samplers switch those off explicitly rather than inherit them.
_PLAIN_SIGMAS: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
_DPMPP_2M: dict[str, Any] = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, dict(_PLAIN_SIGMAS)),
    "dpm++_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, **_PLAIN_SIGMAS}),
    "dpm++_2m_karras": (
        DPMSolverMultistepScheduler,
        {**_DPMPP_2M, **_PLAIN_SIGMAS, "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, dict(_PLAIN_SIGMAS)),  # needs scipy at set_timesteps
    "heun": (HeunDiscreteScheduler, dict(_PLAIN_SIGMAS)),
    "unipc": (UniPCMultistepScheduler, dict(_PLAIN_SIGMAS)),
}


# Flow matching: the plain (deterministic) Euler step on the model's own shift schedule.
# Stochastic sampling would draw from the global RNG (the pipelines pass the scheduler no
# generator), breaking seeded reproducibility.
FLOW_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {**_PLAIN_SIGMAS, "stochastic_sampling": False}),
}


def scheduler_table(flow_matching: bool) -> dict[str, tuple[type[SchedulerMixin], dict[str, Any]]]:
    return FLOW_SCHEDULERS if flow_matching else SCHEDULERS


def make_scheduler(name: str, base_config: Mapping[str, Any],
                   flow_matching: bool = False) -> SchedulerMixin:
    """A fresh scheduler for sampler `name`, derived from a pipeline's scheduler config."""
    table = scheduler_table(flow_matching)
    try:
        cls, kwargs = table[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(table)}") from None
    return cls.from_config(dict(base_config), **kwargs)


class SamplerFactory:
    """Makes schedulers for one pipeline from the scheduler config it was loaded with.

    The config is copied at construction, so swapping `pipe.scheduler` later never changes
    what a sampler name resolves to.
    """

    def __init__(self, base_config: Mapping[str, Any], flow_matching: bool = False) -> None:
        self._base: Mapping[str, Any] = MappingProxyType(dict(base_config))
        self._flow = flow_matching
        self._made: dict[str, SchedulerMixin] = {}

    @property
    def base_config(self) -> Mapping[str, Any]:
        return self._base

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(scheduler_table(self._flow))

    def make(self, name: str) -> SchedulerMixin:
        return make_scheduler(name, self._base, self._flow)

    def get(self, name: str) -> SchedulerMixin:
        """One scheduler per sampler, made once (`from_config` costs ~1.7 ms). Reusing it
        is how diffusers uses `pipe.scheduler`: every pipeline call starts with
        `set_timesteps`, which resets the per-run state (step index, solver history).
        Callers must not run two pipeline calls at once (the runner's lock)."""
        scheduler = self._made.get(name)
        if scheduler is None:
            scheduler = self._made[name] = self.make(name)
        return scheduler
