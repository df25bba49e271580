"""The pipeline families a registry entry can name, and what the ingress must know of them
without importing torch: the samplers each accepts, the size multiple each needs, and the
family of each embedded tiny model. `serve_app.generation.families` is the replica-side
counterpart (what each family does in a pipeline call); tests keep the two in step.
"""

from __future__ import annotations

from pathlib import Path
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

# The half precision each family runs on a GPU (`runtime.dtype: auto`): FLUX's and SD 3's
# activations overflow float16.
HALF_DTYPES: dict[str, str] = {"sd": "float16", "sdxl": "float16", "flux": "bfloat16",
                               "sd3": "bfloat16"}

# What one denoising step costs a full-size model of each family, for the placement check
# (serve_app.placement): dense TFLOP per step at a reference size, both halves of
# classifier-free guidance included where the family uses it. SD 1.5: 51 TFLOP for 30
# steps at 512² (counted by bench/gpu.py with torch.utils.flop_counter); SDXL's UNet ~6.3
# TFLOP a forward at 1024²; FLUX.1 (12B, guidance-distilled: one forward) ~2 x params x
# 4,608 tokens; SD 3.5 Medium (2.5B) ~2 x params x 4,429 tokens, twice. Attention grows
# faster than the pixel count, so the estimate is optimistic for larger sizes.
STEP_TFLOP: dict[str, tuple[float, int]] = {
    "sd": (1.7, 512 * 512),
    "sdxl": (12.7, 1024 * 1024),
    "flux": (110.0, 1024 * 1024),
    "sd3": (44.0, 1024 * 1024),
}

# The embedded tiny models (built locally from fixed seeds) and the family each one is.
TINY_PIPELINES: dict[str, str] = {
    "tiny": "sd",
    "tiny-inpaint": "sd",
    "tiny-sdxl": "sdxl",
    "tiny-flux": "flux",
    "tiny-sd3": "sd3",
}
# Where the trained models ship: in the package, so an installed service has them.
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
# `trained`: the shapes-world models trained here (serve_app.training) and shipped in the
# repository under TRAINED_DIR; `path` is relative to that folder. Loaded like any local
# checkpoint (`from_pretrained`), embedded like the tiny ones (always present).
# `null`: no model at all, for benchmarks of the service's own cost (serve_app.generation
# .null): never in a served registry by default.
Source = Literal["path", "trained", "tiny", "tiny-inpaint", "tiny-sdxl", "tiny-flux", "tiny-sd3",
                 "null"]


def samplers_for(pipeline: str) -> tuple[str, ...]:
    """The sampler names a model of family `pipeline` accepts, the default first."""
    return PIPELINE_SAMPLERS[pipeline]
