"""A model's adapters in the registry: LoRAs and ControlNets, torch-free.

Each registry entry may list `loras` and `control_nets`. A LoRA is a small set of weight
deltas for the model's denoiser (and text encoders) that a request switches on by name with
a scale; a ControlNet is a second network that steers the denoiser with a control image.
Both are per base model: they only fit the architecture they were trained for.

Sources:
- `path` (the default): a local file or folder, absolute or relative to MODEL_PATH. A LoRA
  is one `.safetensors` file (or a folder holding exactly one) in diffusers/PEFT format
  (`unet.…`/`transformer.…` keys, as `save_lora_weights` writes) or kohya format
  (`lora_unet_…` keys with `lora_down`/`lora_up`/`alpha`, as sd-scripts and most community
  LoRAs ship); a ControlNet is a diffusers folder (`config.json` + weights).
- `trained`: the adapters trained with the shapes-world models (serve_app.training),
  shipped under `TRAINED_DIR`; `path` is relative to it.
- `tiny-lora` / `tiny-controlnet`: seeded test adapters for the embedded tiny models, built
  into the cache folder on first use (`serve_app.generation.tiny_adapters`).

A dedicated inpainting model (a base model's `inpainting_model`) takes its base model's
LoRAs too: an inpainting UNet has the same attention layers, so an inpainting job that
carries LoRAs runs them on the model that does the inpainting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from serve_app.model_families import TRAINED_DIR, Pipeline
from serve_app.model_runtime import Strict

# The families whose ControlNet pipelines the replicas drive (diffusers' SD 1.x and SDXL
# ControlNet text2img / img2img pipelines).
CONTROL_NET_PIPELINES: tuple[str, ...] = ("sd", "sdxl")
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LORA_SUFFIX = ".safetensors"


class LoraSpec(Strict):
    """One LoRA of a model, as `config/models.yaml` lists it."""

    name: str = Field(pattern=ADAPTER_NAME)
    description: str = ""
    source: Literal["path", "trained", "tiny-lora"] = "path"
    path: str | None = None
    format: Literal["diffusers", "kohya"] = "diffusers"
    # The family it was trained for; left out, its model's. A mismatch stops the start.
    pipeline: Pipeline | None = None
    # tiny-lora only: the seed of its weights (two tiny LoRAs with other seeds differ).
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sourced(self) -> LoraSpec:
        _check_source(self.source, self.path, "tiny-lora")
        return self


class ControlNetSpec(Strict):
    """One ControlNet of a model, as `config/models.yaml` lists it."""

    id: str = Field(pattern=ADAPTER_NAME)
    description: str = ""
    source: Literal["path", "trained", "tiny-controlnet"] = "path"
    path: str | None = None
    pipeline: Pipeline | None = None
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sourced(self) -> ControlNetSpec:
        _check_source(self.source, self.path, "tiny-controlnet")
        return self


def _check_source(source: str, path: str | None, tiny: str) -> None:
    if source in ("path", "trained") and not path:
        raise ValueError(f"an adapter with source {source!r} needs a 'path'")
    if source == tiny and path:
        raise ValueError(f"a {tiny} adapter is built locally: leave out 'path'")


def adapter_problems(model_id: str, pipeline: str, tiny_model: bool,
                     loras: tuple[LoraSpec, ...],
                     control_nets: tuple[ControlNetSpec, ...]) -> list[str]:
    """What is wrong with a model's adapter lists (an empty list when nothing is)."""
    problems = []
    for kind, names in (("LoRA", [lo.name for lo in loras]),
                        ("ControlNet", [c.id for c in control_nets])):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"duplicate {kind} names: {', '.join(duplicates)}")
    adapters: list[LoraSpec | ControlNetSpec] = [*loras, *control_nets]
    for adapter in adapters:
        label = _label(adapter)
        if adapter.pipeline is not None and adapter.pipeline != pipeline:
            problems.append(f"{label} is a {adapter.pipeline} adapter; model {model_id!r} is "
                            f"a {pipeline} model: it cannot load it")
        if adapter.source != "path" and not tiny_model:
            problems.append(f"{label}: {adapter.source} adapters fit the embedded tiny "
                            "models only")
    if control_nets and pipeline not in CONTROL_NET_PIPELINES:
        problems.append(f"ControlNets are supported on {' and '.join(CONTROL_NET_PIPELINES)} "
                        f"models, not on {pipeline} model {model_id!r}")
    return problems


def inherit_loras(models: Any) -> Any:
    """Raw registry models with each dedicated inpainting model given its base model's
    LoRAs (those it does not list itself): see the module docstring."""
    if not isinstance(models, list):
        return models
    out = [dict(m) if isinstance(m, dict) else m for m in models]
    by_id = {m.get("id"): m for m in out if isinstance(m, dict)}
    for base in list(by_id.values()):
        target = by_id.get(base.get("inpainting_model"))
        inherited = base.get("loras")
        if target is None or target is base or not isinstance(inherited, list):
            continue
        own = target.get("loras") or []
        if not isinstance(own, list):
            continue
        names = {lo.get("name") for lo in own if isinstance(lo, dict)}
        target["loras"] = own + [lo for lo in inherited
                                 if isinstance(lo, dict) and lo.get("name") not in names]
    return out


def adapter_path(kind: Literal["loras", "controlnets"], adapter: LoraSpec | ControlNetSpec,
                 model_id: str, cache_dir: str, model_path: str) -> Path:
    """Where an adapter's weights are: a tiny one's build folder under the cache (one per
    model, since it is built from that model's denoiser), else its registry path."""
    if adapter.path is None:
        return Path(cache_dir) / "adapters" / model_id / kind / _name(adapter)
    if adapter.source == "trained":
        return TRAINED_DIR / adapter.path
    path = Path(adapter.path).expanduser()
    return path if path.is_absolute() else Path(model_path) / path


def describe_loras(loras: tuple[LoraSpec, ...]) -> list[dict[str, Any]]:
    """`GET /models`' `loras` field: what a client needs to pick one (no file paths)."""
    return [{"name": lo.name, "description": lo.description, "format": lo.format}
            for lo in loras]


def describe_control_nets(control_nets: tuple[ControlNetSpec, ...]) -> list[dict[str, Any]]:
    """`GET /models`' `controlNets` field."""
    return [{"id": c.id, "description": c.description} for c in control_nets]


def _name(adapter: LoraSpec | ControlNetSpec) -> str:
    return adapter.name if isinstance(adapter, LoraSpec) else adapter.id


def _label(adapter: LoraSpec | ControlNetSpec) -> str:
    kind = "LoRA" if isinstance(adapter, LoraSpec) else "ControlNet"
    return f"{kind} {_name(adapter)!r}"
