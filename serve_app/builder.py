"""The app builder: `import_path: serve_app.builder:build_app` in config/serve.yaml.

Composes the three kinds of deployment: one model replica deployment per served model
(its own name, resources and autoscaling), or per model pool (`pool-<id>`, whose replicas
load the pool's models on demand), the job tracker that owns job state (one per
tracker shard, each owning some models' jobs: `serve_app.shards`), and the HTTP ingress.
`serve run config/serve.yaml` and `serve deploy config/serve.yaml` both land here with the
YAML's `args`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.model import ModelReplica, pool_replica_class
from deployments.tracker import Tracker, model_deployment_name, pool_deployment_name
from serve_app.blobs import open_blobs
from serve_app.errors import ConfigError
from serve_app.generation.preload import model_runtime_env
from serve_app.model_pools import PoolSpec
from serve_app.model_runtime import Resources, Scaling
from serve_app.placement import Cluster, measure_cpu_gflops, needs_cpu_speed, place_all
from serve_app.registry import ModelSpec, Registry, load_registry, parse_registry
from serve_app.settings import Settings, load_settings
from serve_app.shards import ShardMap, tracker_deployment_name


class AppArgs(BaseModel):
    """The `args` of the application in a serve config."""

    model_config = ConfigDict(extra="forbid")

    # Path to the model registry (absolute, relative to the working directory, or to
    # the project), or the registry inline as `{"models": [...]}`.
    models: str | dict[str, Any] = "config/models.yaml"
    # Overrides of `serve_app.settings.Settings` fields; environment variables win.
    settings: dict[str, Any] = {}
    # HTTP ingress replicas (each answers HTTP itself behind Serve's HAProxy).
    ingress_replicas: int = Field(1, ge=1, le=64)
    # Tracker actors, each owning the jobs of some of the served models (dealt in registry
    # order). More than one needs a store they all reach: IMAGEGEN_STORE=redis.
    tracker_shards: int = Field(1, ge=1, le=64)


# The ingress and the tracker take no CPU of their own from Ray's accounting: they are
# light, and a CPU reserved for them is one a model replica cannot have.
INGRESS_OPTIONS: dict[str, Any] = {
    "name": "Ingress", "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0},
}
# A tracker (shard) is one replica: it owns its models' jobs. It answers many small calls
# at once.
TRACKER_OPTIONS: dict[str, Any] = {
    "num_replicas": 1, "max_ongoing_requests": 10_000, "ray_actor_options": {"num_cpus": 0},
}


def model_options(spec: ModelSpec) -> dict[str, Any]:
    """Serve deployment options for one model, from its registry entry."""
    return _replica_options(model_deployment_name(spec.id), spec.resources, spec.scaling)


def pool_options(pool: PoolSpec) -> dict[str, Any]:
    """Serve deployment options for a model pool: as a model's, from the pool's entry."""
    return _replica_options(pool_deployment_name(pool.id), pool.resources, pool.scaling)


def _replica_options(name: str, resources: Resources, scaling: Scaling) -> dict[str, Any]:
    return {
        "name": name,
        "health_check_period_s": 10,
        # The runtime env marks the replica's process as a model's: Ray then hands it one
        # of the warm workers kept with the same env (deployments/warm_pool.py).
        "ray_actor_options": resources.ray_actor_options() | {"runtime_env": model_runtime_env()},
        "autoscaling_config": scaling.autoscaling_config(),
        # One call at a time per replica (a batch of jobs is one call): calls beyond the
        # ready replicas queue in Serve's router, which is the demand autoscaling sees.
        "max_ongoing_requests": 1,
        "graceful_shutdown_timeout_s": scaling.graceful_shutdown_timeout_s,
    }


def model_handles(registry: Registry, served: list[ModelSpec], settings: Settings
                  ) -> dict[str, Any]:
    """Each served model's bound deployment: its own, or its pool's (one per pool, shared
    by the pool's models; the tracker names the model in each call)."""
    pools: dict[str, Any] = {}
    for pool in registry.pools:
        members = [spec for spec in served if spec.pool == pool.id]
        if members:
            pools[pool.id] = serve.deployment(pool_replica_class(pool), **pool_options(pool)
                                              ).bind(pool, members, settings)
    return {spec.id: pools[spec.pool] if spec.pool else
            serve.deployment(ModelReplica, **model_options(spec)).bind(spec, settings)
            for spec in served}


def resolve(args: AppArgs) -> tuple[Settings, Registry, list[ModelSpec]]:
    settings = load_settings(args.settings)
    settings.check_exposure(settings.host)
    if args.tracker_shards > 1 and settings.store != "redis":
        raise ConfigError(
            f"tracker_shards: {args.tracker_shards} needs a job store every shard and ingress "
            f"replica reaches: set IMAGEGEN_STORE=redis (and IMAGEGEN_REDIS_URL), not "
            f"{settings.store!r}")
    if settings.blobs.startswith("memory:"):
        raise ConfigError(
            "IMAGEGEN_BLOB_URL memory:// lives in one process, but replicas write images "
            "that the ingress reads: use file:///absolute/path (one node, or a shared "
            "filesystem) or s3://bucket/prefix")
    open_blobs(settings)  # a URL that cannot work stops the start here, naming it
    registry = (
        load_registry(args.models)
        if isinstance(args.models, str)
        else parse_registry(args.models, "inline models")
    )
    registry = place_all(registry, detect_cluster(settings, registry),
                         settings.job_timeout_ms / 1000)
    served = registry.served(settings)
    served_ids = {m.id for m in served}
    if settings.default_model not in served_ids:
        default = settings.default_model
        raise ConfigError(
            f"The default model {default!r} is not served: "
            + ("it is not in the registry" if registry.get(default) is None
               else registry.unavailable.get(default)
               or f"its weights are missing under MODEL_PATH={settings.model_path}")
        )
    return settings, registry, served


def detect_cluster(settings: Settings, registry: Registry) -> Cluster:
    """What the models can be placed on: GPUs (IMAGEGEN_ACCELERATOR, or Ray's nodes now),
    and, where a model's placement depends on it, this node's CPU speed."""
    gpus = settings.accelerator == "cuda" or (
        settings.accelerator == "auto" and _ray_gpus() > 0)
    if gpus or not needs_cpu_speed(registry.model_copy(update={
            "models": [m for m in registry.models if m.weights_present(settings)]})):
        return Cluster(gpus=gpus)
    return Cluster(gpus=False, cpu_gflops=measure_cpu_gflops())


def _ray_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    args = AppArgs.model_validate(args or {})
    settings, registry, served = resolve(args)
    models = model_handles(registry, served, settings)
    # A pool's models share its replicas and its capacity: one shard owns all of them.
    shards = ShardMap.deal([spec.id for spec in served], args.tracker_shards,
                           groups={spec.id: spec.pool for spec in served if spec.pool})
    trackers = [
        serve.deployment(Tracker, name=tracker_deployment_name(i), **TRACKER_OPTIONS).bind(
            settings, registry, own, {m: models[m] for m in own}, shards, i)
        for i, own in enumerate(shards.shards)
    ]
    ingress = serve.deployment(serve.ingress()(Ingress), **INGRESS_OPTIONS,
                               num_replicas=args.ingress_replicas)
    return ingress.bind(trackers, shards, settings, registry, args.ingress_replicas)
