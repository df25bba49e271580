"""A request's `loras` and `controlNet` checked against the model's registry entry.

Called by `serve_app.api.validation` once the model is known. Every message names the wire
field and lists what the model has, so a client can fix the request from the 400 alone. The
control image is decoded and bounded like every input image (`input_images`); its canny
preprocessing runs on the replica (OpenCV is not an ingress dependency).
"""

from __future__ import annotations

import difflib
from typing import Any

from serve_app.api import input_images as images
from serve_app.api.wire import GenerationCommon
from serve_app.errors import InvalidRequest
from serve_app.lora_folders import find_lora, model_loras
from serve_app.messages import ControlInput, JobType
from serve_app.registry import ModelSpec, Registry
from serve_app.settings import Limits

CONTROL_MODES = (JobType.TEXT2IMG, JobType.IMG2IMG)


def check_loras(req: GenerationCommon, spec: ModelSpec, registry: Registry,
                limits: Limits, model_path: str = "") -> tuple[tuple[str, float], ...]:
    """The request's LoRAs as `(name, scale)` pairs, each one of `spec`'s (its registry
    LoRAs and the files of its `lora_dirs`, under `model_path`), by name (the replica
    applies them in that order whatever the request's: one set, one batch key)."""
    if len(req.loras) > limits.max_loras:
        raise InvalidRequest(f"loras: at most {limits.max_loras} LoRAs per request "
                             f"(got {len(req.loras)})")
    seen: set[str] = set()
    out = []
    for i, ref in enumerate(req.loras):
        if find_lora(spec, ref.name, model_path) is None:
            raise InvalidRequest(_unknown_lora(ref.name, spec, registry, model_path))
        if ref.name in seen:
            raise InvalidRequest(f"loras[{i}]: LoRA {ref.name!r} is listed twice; give it once "
                                 "with the scale you want")
        bound = limits.max_lora_scale
        if not -bound <= ref.scale <= bound:
            raise InvalidRequest(f"loras[{i}].scale must be between {-bound:g} and {bound:g} "
                                 f"(got {ref.scale:g})")
        seen.add(ref.name)
        out.append((ref.name, float(ref.scale)))
    return tuple(sorted(out))


def check_control(req: GenerationCommon, job_type: JobType, spec: ModelSpec,
                  limits: Limits) -> ControlInput | None:
    """The request's ControlNet conditioning, its image decoded, or None without one."""
    ref = req.control_net
    if ref is None:
        return None
    if job_type not in CONTROL_MODES:
        raise InvalidRequest(f"controlNet applies to text2img and img2img, not {job_type.value}")
    if spec.control_net(ref.model) is None:
        have = ", ".join(c.id for c in spec.control_nets) or "none"
        raise InvalidRequest(f"controlNet.model: unknown ControlNet {ref.model!r} for model "
                             f"{spec.id!r}; its ControlNets: {have} (GET /models lists them)")
    top = limits.max_conditioning_scale
    if not 0 <= ref.conditioning_scale <= top:
        raise InvalidRequest(f"controlNet.conditioningScale must be between 0 and {top:g} "
                             f"(got {ref.conditioning_scale:g})")
    image = images.decode_input_image(ref.image, "controlNet.image", limits)
    return ControlInput(model=ref.model, image=image,
                        conditioning_scale=float(ref.conditioning_scale),
                        preprocess=ref.preprocess)


def echo_adapters(echo: dict[str, Any], control: ControlInput | None) -> None:
    """In a job's request record: LoRAs only when given, the control image described."""
    if not echo.get("loras"):
        echo.pop("loras", None)
    if control is None:
        echo.pop("controlNet", None)
    else:
        echo["controlNet"]["image"] = images.describe(control.image)


def _unknown_lora(name: str, spec: ModelSpec, registry: Registry, model_path: str) -> str:
    names = [lo.name for lo in model_loras(spec, model_path)]
    have = ", ".join(names) or "none"
    owners = [m for m in registry.models if m.lora(name) is not None]
    if owners:
        where = ", ".join(f"{m.id} (a {m.pipeline} model)" for m in owners)
        return (f"loras: LoRA {name!r} belongs to {where}, not to model {spec.id!r} (a "
                f"{spec.pipeline} model): a LoRA only fits the model it was made for; "
                f"{spec.id}'s LoRAs: {have}")
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if near:
        return (f"loras: unknown LoRA {name!r} for model {spec.id!r}; did you mean "
                f"{', '.join(near)}? (GET /models lists its {len(names)} LoRAs)")
    if len(names) > 20:
        return (f"loras: unknown LoRA {name!r} for model {spec.id!r}, and no name is close; "
                f"GET /models lists its {len(names)} LoRAs")
    return f"loras: unknown LoRA {name!r} for model {spec.id!r}; its LoRAs: {have} " \
           "(GET /models lists them)"
