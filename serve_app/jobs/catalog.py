"""GET /models: the registry as clients see it, with each served model's ready replicas."""

from __future__ import annotations

from typing import Any

from serve_app.lora_folders import model_loras
from serve_app.model_adapters import describe_control_nets, describe_loras
from serve_app.model_pools import PoolSpec
from serve_app.registry import ModelSpec, Registry


def describe_models(registry: Registry, served: frozenset[str], ready: dict[str, int],
                    default_model: str, loaded: dict[str, int] | None = None,
                    model_path: str = "") -> dict[str, Any]:
    """`loaded`: per pool model, on how many of its pool's replicas it is loaded now;
    `model_path`: where relative `lora_dirs` are (their files are listed as LoRAs)."""
    loaded = loaded or {}
    models = []
    for spec in registry.models:
        entry = describe_model(spec, spec.id in served, ready.get(spec.id, 0),
                               spec.id == default_model, registry.unavailable.get(spec.id))
        if spec.lora_dirs:
            entry["loras"] = describe_loras(model_loras(spec, model_path))
        pool = registry.pool_of(spec.id)
        if pool is not None:
            replicas = loaded.get(spec.id, 0) if spec.id in served else 0
            entry.update(pool_fields(pool, spec.id in served, ready.get(spec.id, 0), replicas))
        models.append(entry)
    return {"models": models}


def pool_fields(pool: PoolSpec, served: bool, pool_ready: int, holding: int
                ) -> dict[str, Any]:
    """A pool model's entry: its pool, its pool's replicas and scaling, and on how many of
    them the model is loaded now (`loaded`: on at least one)."""
    return {"pool": pool.id, "loaded": holding > 0, "loadedReplicas": holding,
            "poolReplicas": pool_ready if served else 0,
            "maxModelsPerReplica": pool.models_per_replica,
            "replicas": holding,
            "minReplicas": pool.scaling.min_replicas, "maxReplicas": pool.scaling.max_replicas,
            "maxBatchSize": pool.scaling.max_batch_size,
            "numGpus": pool.resources.num_gpus}


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
