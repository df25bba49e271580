"""The pipeline families a registry entry can name, and what the ingress must know of them
without importing torch: the samplers each accepts, the size multiple each needs, and the
family of each embedded tiny model. `serve_app.generation.families` is the replica-side
counterpart (what each family does in a pipeline call); tests keep the two in step.
"""

from __future__ import annotations

from typing import Literal

from serve_app.messages import SAMPLERS

Pipeline = Literal["sd", "sdxl", "flux", "sd3"]

# The samplers each pipeline family accepts (torch-free, so the ingress can refuse a job
# before it is queued). Flow-matching families (FLUX, SD 3.x) step with
# FlowMatchEulerDiscreteScheduler only: diffusers 0.42's other flow-capable schedulers
# (DPM++/UniPC with flow sigmas) lack the `scale_noise` their img2img and inpainting
# pipelines call, and FlowMatchHeun takes no custom sigmas, which the FLUX pipeline passes.
FLOW_MATCHING_SAMPLERS: tuple[str, ...] = ("euler",)
PIPELINE_SAMPLERS: dict[str, tuple[str, ...]] = {
    "sd": SAMPLERS,
    "sdxl": SAMPLERS,
    "flux": FLOW_MATCHING_SAMPLERS,
    "sd3": FLOW_MATCHING_SAMPLERS,
}

# Width and height must be multiples of this (the VAE's factor 8; FLUX packs 2x2 latents
# and SD 3 patches them 2x2). The replica checks it on the loaded pipeline; this copy lets
# the ingress refuse a size before a job exists (tests keep the two in step).
SIZE_MULTIPLES: dict[str, int] = {"sd": 8, "sdxl": 8, "flux": 16, "sd3": 16}

# The embedded tiny models (built locally from fixed seeds) and the family each one is.
TINY_PIPELINES: dict[str, str] = {
    "tiny": "sd",
    "tiny-inpaint": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-flux": "flux",
    "tiny-sd3": "sd3",
}
# `null`: no model at all, for benchmarks of the service's own cost (serve_app.generation
# .null): never in a served registry by default.
Source = Literal["path", "tiny", "tiny-inpaint", "tiny-sdxl", "tiny-flux", "tiny-sd3", "null"]


def samplers_for(pipeline: str) -> tuple[str, ...]:
    """The sampler names a model of family `pipeline` accepts, the default first."""
    return PIPELINE_SAMPLERS[pipeline]
