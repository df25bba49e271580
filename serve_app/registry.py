"""The model registry: `config/models.yaml` parsed, checked and resolved against MODEL_PATH.
(Over ~300 lines: one entry's schema, and its checks belong beside the fields they check.)

A model is *served* when its weights are present (or, for the embedded tiny models, when
they can be built locally); the app builder creates one replica deployment per served model.
Unknown keys anywhere stop the start with a message naming them: Ray silently ignores
unknown autoscaling keys, so this is the only place a typo can be caught. The entries'
parts are schemas of their own: `model_runtime` (scaling, resources, runtime knobs),
`model_adapters` (LoRAs, ControlNets), `model_upscalers`, `model_pools`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from serve_app.errors import ConfigError
from serve_app.messages import SAMPLERS
from serve_app.model_adapters import (
    ControlNetSpec,
    LoraSpec,
    adapter_path,
    adapter_problems,
    inherit_loras,
)
from serve_app.model_families import (
    PIPELINE_SAMPLERS,
    SIZE_MULTIPLES,
    TINY_PIPELINES,
    TRAINED_DIR,
    Pipeline,
    Source,
    samplers_for,
)
from serve_app.model_pools import PoolSpec, pool_lora_dirs
from serve_app.model_runtime import Resources, Runtime, Scaling, Strict
from serve_app.model_upscalers import UpscalerSpec
from serve_app.settings import PROJECT_ROOT, Settings


class Defaults(Strict):
    """What a request gets for each field it leaves out."""

    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler_a"

    @model_validator(mode="after")
    def _known_sampler(self) -> Defaults:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        return self


class ModelSpec(Strict):
    """One registry entry."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    name: str
    description: str
    type: Literal["base", "inpainting", "turbo", "refiner"] = "base"
    version: str = "1.0"
    # The diffusers pipeline family. Left out, it is `sd`, or the family of a tiny source.
    pipeline: Pipeline = "sd"
    # `tiny*` (see TINY_PIPELINES): built locally from fixed seeds. `trained`: shipped in the
    # package (`path` relative to TRAINED_DIR). Otherwise `path` (relative to MODEL_PATH,
    # or absolute) is a diffusers folder or a single .safetensors/.ckpt file.
    source: Source = "path"
    path: str | None = None
    inpainting_model: str | None = None
    ip_adapter: str | None = None
    image_encoder: str | None = None
    # Per-request adapters (serve_app.model_adapters): LoRAs by name, ControlNets by id.
    loras: tuple[LoraSpec, ...] = ()
    # Folders (absolute, or relative to MODEL_PATH) whose every .safetensors file is a LoRA
    # of this model, requested by its file stem, rescanned while serving
    # (serve_app.lora_folders). A pool model's list ends with its pool's.
    lora_dirs: tuple[str, ...] = ()
    # Tiny sources only: another seed gives the same architecture with other weights, so
    # several distinct test checkpoints can run here (a pool of them, say).
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    # The pool whose replicas load this model on demand (`pools:`); left out, the model
    # has its own deployment.
    pool: str | None = None
    control_nets: tuple[ControlNetSpec, ...] = ()
    defaults: Defaults = Defaults()
    scaling: Scaling = Scaling()
    resources: Resources = Resources()
    runtime: Runtime = Runtime()

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """A tiny source implies its family; a family implies its default sampler."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "pipeline" not in data and data.get("source") in TINY_PIPELINES:
            data["pipeline"] = TINY_PIPELINES[data["source"]]
        family = data.get("pipeline", "sd")
        defaults = data.get("defaults")
        if family in PIPELINE_SAMPLERS and (defaults is None or isinstance(defaults, dict)):
            defaults = dict(defaults or {})
            defaults.setdefault("sampler", samplers_for(family)[0])
            data["defaults"] = defaults
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.source in ("path", "trained") and not self.path:
            raise ValueError(f"a model with source {self.source!r} needs a 'path'")
        tiny_family = TINY_PIPELINES.get(self.source)
        if tiny_family is not None and tiny_family != self.pipeline:
            raise ValueError(
                f"source {self.source!r} is a {tiny_family!r} model, not pipeline {self.pipeline!r}"
            )
        problem = self.sampler_error(self.defaults.sampler)
        if problem is not None:
            raise ValueError(f"defaults.sampler: {problem}")
        if self.seed is not None and self.source not in TINY_PIPELINES:
            raise ValueError(f"seed applies to the tiny sources only, not source {self.source!r}")
        if self.pool is not None:
            own = sorted({"scaling", "resources"} & self.model_fields_set)
            if own:
                raise ValueError(f"a pool model's {' and '.join(own)} are its pool's: set "
                                 f"them on pool {self.pool!r}, not on the model")
        problems = adapter_problems(self.id, self.pipeline, self.is_tiny, self.loras,
                                    self.control_nets)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def lora(self, name: str) -> LoraSpec | None:
        return next((lo for lo in self.loras if lo.name == name), None)

    def control_net(self, net_id: str) -> ControlNetSpec | None:
        return next((c for c in self.control_nets if c.id == net_id), None)

    def adapter_path(self, adapter: LoraSpec | ControlNetSpec, settings: Settings) -> Path:
        """Where `adapter`'s weights are (see `serve_app.model_adapters.adapter_path`)."""
        kind = "loras" if isinstance(adapter, LoraSpec) else "controlnets"
        return adapter_path(kind, adapter, self.id, settings.cache_dir, settings.model_path)

    @property
    def samplers(self) -> tuple[str, ...]:
        """The sampler names this model accepts."""
        return samplers_for(self.pipeline)

    @property
    def size_multiple(self) -> int:
        """What width and height must be multiples of for this model."""
        return SIZE_MULTIPLES[self.pipeline]

    def sampler_error(self, sampler: str) -> str | None:
        """Why `sampler` cannot run on this model (a message naming the valid ones), or
        None when it can."""
        if sampler in self.samplers:
            return None
        valid = ", ".join(self.samplers)
        if sampler in SAMPLERS:
            return (f"Sampler {sampler!r} does not apply to model {self.id!r} (a {self.pipeline} "
                    f"model); valid samplers: {valid}")
        return f"Unknown sampler {sampler!r}; valid samplers: {valid}"

    @property
    def is_tiny(self) -> bool:
        """An embedded model (built here or shipped here): always present, CPU-sized."""
        return self.source != "path"

    @property
    def is_built(self) -> bool:
        """Built locally from fixed seeds on first use (`tiny*` sources)."""
        return self.source in TINY_PIPELINES

    def weights_path(self, settings: Settings) -> Path:
        if self.source == "trained":
            assert self.path is not None  # checked by the validator above
            return TRAINED_DIR / self.path
        if self.is_tiny:
            # A seeded variant has its own folder: changing the seed never reuses weights.
            name = self.id if self.seed is None else f"{self.id}.seed-{self.seed}"
            return Path(settings.cache_dir) / name
        assert self.path is not None  # checked by the validator above
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else Path(settings.model_path) / path

    def weights_present(self, settings: Settings) -> bool:
        """Whether this model can be served here: tiny models always can (built on demand)."""
        if self.is_tiny:
            return True
        path = self.weights_path(settings)
        if path.is_dir():
            return (path / "model_index.json").is_file()
        return path.is_file()


class Registry(Strict):
    models: list[ModelSpec]
    upscalers: list[UpscalerSpec] = []
    pools: list[PoolSpec] = []
    # Set at startup (serve_app.placement), never in a registry file: models that cannot
    # be served on this cluster, and why.
    unavailable: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _inherit_loras(cls, data: Any) -> Any:
        if isinstance(data, dict) and "models" in data:
            data = {**data, "models": pool_lora_dirs(inherit_loras(data["models"]),
                                                      data.get("pools"))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Registry:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {', '.join(duplicates)}")
        for m in self.models:
            if m.inpainting_model and m.inpainting_model not in ids:
                raise ValueError(
                    f"model {m.id!r} names inpainting_model {m.inpainting_model!r}, "
                    "which is not in the registry"
                )
        names = [u.name for u in self.upscalers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate upscaler names: {', '.join(sorted(names))}")
        self._check_pools()
        return self

    def upscaler(self, name: str) -> UpscalerSpec | None:
        return next((u for u in self.upscalers if u.name == name), None)

    def _check_pools(self) -> None:
        pool_ids = [p.id for p in self.pools]
        duplicates = sorted({i for i in pool_ids if pool_ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate pool ids: {', '.join(duplicates)}")
        for m in self.models:
            if m.pool is not None and m.pool not in pool_ids:
                raise ValueError(f"model {m.id!r} names pool {m.pool!r}, which is not in "
                                 f"pools: ({', '.join(pool_ids) or 'none'})")
        for pool in self.pools:
            members = self.pool_models(pool.id)
            if not members:
                raise ValueError(f"pool {pool.id!r} has no models: name it as a model's pool")
            families = sorted({m.pipeline for m in members})
            if len(families) > 1:
                by_family = "; ".join(
                    f"{f}: {', '.join(m.id for m in members if m.pipeline == f)}"
                    for f in families)
                raise ValueError(f"pool {pool.id!r} mixes pipeline families ({by_family}): "
                                 "a pool's models must share one family; split the pool")

    def pool(self, pool_id: str) -> PoolSpec | None:
        return next((p for p in self.pools if p.id == pool_id), None)

    def pool_models(self, pool_id: str) -> list[ModelSpec]:
        return [m for m in self.models if m.pool == pool_id]

    def pool_of(self, model_id: str) -> PoolSpec | None:
        """The pool that serves `model_id`, or None for a model with its own deployment."""
        spec = self.get(model_id)
        return self.pool(spec.pool) if spec is not None and spec.pool else None

    def scaling_of(self, model_id: str) -> Scaling | None:
        """The scaling a model's calls run under: its pool's, else its own."""
        spec = self.get(model_id)
        if spec is None:
            return None
        pool = self.pool_of(model_id)
        return pool.scaling if pool is not None else spec.scaling

    def get(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    def served(self, settings: Settings) -> list[ModelSpec]:
        return [m for m in self.models
                if m.id not in self.unavailable and m.weights_present(settings)]


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, else relative to the working directory, else to the project."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def parse_registry(data: Any, source: str = "models config") -> Registry:
    if isinstance(data, dict) and "unavailable" in data:
        raise ConfigError(f"Invalid {source}: unavailable: unknown key")
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _describe_location(data, err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"Invalid {source}: " + "; ".join(problems)) from None


def load_registry(path: str | Path) -> Registry:
    resolved = resolve_config_path(path)
    try:
        data = yaml.safe_load(resolved.read_text())
    except OSError as exc:
        raise ConfigError(f"Cannot read models config {resolved}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Models config {resolved} is not valid YAML: {exc}") from None
    return parse_registry(data, f"models config {resolved}")


def _describe_location(data: Any, loc: tuple[int | str, ...]) -> str:
    """`models[2] (sdxl).scaling.min_replica` rather than `models.2.scaling.min_replica`."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                model_id = node[item].get("id")
                label += f" ({model_id})" if model_id else ""
            parts.append(label)
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "top level"
