"""GET /models: the registry as clients see it, with each served model's ready replicas."""

from __future__ import annotations

from typing import Any

from serve_app.model_adapters import describe_control_nets, describe_loras
from serve_app.registry import ModelSpec, Registry


def describe_models(registry: Registry, served: frozenset[str], ready: dict[str, int],
                    default_model: str) -> dict[str, Any]:
    return {"models": [describe_model(spec, spec.id in served, ready.get(spec.id, 0),
                                      spec.id == default_model,
                                      registry.unavailable.get(spec.id))
                       for spec in registry.models]}


def describe_model(spec: ModelSpec, served: bool, ready: int, default: bool,
                   unavailable: str | None = None) -> dict[str, Any]:
    replicas = ready if served else 0
    return {
        "id": spec.id,
        "name": spec.name,
        "description": spec.description,
        "type": spec.type,
        "pipeline": spec.pipeline,
        "samplers": list(spec.samplers),
        "loaded": replicas > 0,
        "version": spec.version,
        "served": served,
        # Why it is not served, where that was decided at startup (serve_app.placement).
        "unavailable": unavailable,
        "device": spec.runtime.device,
        "numGpus": spec.resources.num_gpus,
        "replicas": replicas,
        "minReplicas": spec.scaling.min_replicas,
        "maxReplicas": spec.scaling.max_replicas,
        "maxBatchSize": spec.scaling.max_batch_size,
        "defaults": {"width": spec.defaults.width, "height": spec.defaults.height,
                     "steps": spec.defaults.steps, "sampler": spec.defaults.sampler,
                     "guidanceScale": spec.defaults.guidance_scale},
        "default": default,
        "loras": describe_loras(spec.loras),
        "controlNets": describe_control_nets(spec.control_nets),
    }
