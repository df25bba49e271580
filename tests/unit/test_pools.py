"""Model pools in the registry, and the seeded tiny variants that let a pool run here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import ConfigError
from serve_app.registry import parse_registry
from serve_app.settings import Settings


def model(model_id: str, **over: Any) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "description": "d", "source": "tiny"} | over


def pool(pool_id: str = "shared", **over: Any) -> dict[str, Any]:
    return {"id": pool_id, "max_models_per_replica": 3,
            "scaling": {"min_replicas": 0, "max_replicas": 2}} | over


def test_a_pool_and_its_models_parse() -> None:
    registry = parse_registry({
        "pools": [pool(resources={"num_cpus": 1})],
        "models": [model("a", seed=1, pool="shared"), model("b", seed=2, pool="shared"),
                   model("solo")],
    })
    shared = registry.pool("shared")
    assert shared is not None and shared.models_per_replica == 3
    assert [m.id for m in registry.pool_models("shared")] == ["a", "b"]
    assert registry.pool_of("a") is shared and registry.pool_of("solo") is None
    assert registry.scaling_of("a") == shared.scaling
    assert registry.scaling_of("solo") == registry.get("solo").scaling


def test_pool_models_must_share_a_family_and_the_error_names_them() -> None:
    with pytest.raises(ConfigError) as err:
        parse_registry({"pools": [pool()], "models": [
            model("a", pool="shared"), model("b", pool="shared"),
            model("x", source="tiny-sdxl", pool="shared")]})
    message = str(err.value)
    assert "pool 'shared' mixes pipeline families (sd: a, b; sdxl: x)" in message


@pytest.mark.parametrize(("data", "expected"), [
    ({"pools": [], "models": [model("a", pool="nope")]},
     "model 'a' names pool 'nope', which is not in pools: (none)"),
    ({"pools": [pool(), pool()], "models": [model("a", pool="shared")]},
     "duplicate pool ids: shared"),
    ({"pools": [pool(), pool("empty")], "models": [model("a", pool="shared")]},
     "pool 'empty' has no models"),
    ({"pools": [pool()], "models": [model("a", pool="shared", scaling={"max_replicas": 3})]},
     "a pool model's scaling are its pool's: set them on pool 'shared'"),
    ({"pools": [pool(memory_budget_gb=20)], "models": [model("a", pool="shared")]},
     "memory_budget_gb and model_memory_gb go together"),
    ({"pools": [pool(memory_budget_gb=4, model_memory_gb=7)],
      "models": [model("a", pool="shared")]},
     "does not hold one model"),
    ({"pools": [pool(max_models=3)], "models": [model("a", pool="shared")]},
     "pools[0] (shared).max_models: unknown key"),
    ({"models": [model("a", source="path", path="x", seed=3)]},
     "seed applies to the tiny sources only"),
])
def test_bad_pools_stop_the_start_with_a_message(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_registry(data)
    assert expected in str(err.value)


def test_a_memory_budget_caps_the_models_a_replica_keeps() -> None:
    registry = parse_registry({"pools": [pool(max_models_per_replica=10, memory_budget_gb=24,
                                              model_memory_gb=7)],
                               "models": [model("a", pool="shared")]})
    assert registry.pool("shared").models_per_replica == 3


def test_seeded_variants_get_their_own_cache_folder(settings: Settings) -> None:
    registry = parse_registry({"models": [model("a", seed=1), model("b")]})
    assert registry.get("a").weights_path(settings).name == "a.seed-1"
    assert registry.get("b").weights_path(settings).name == "b"


def _digest(folder: Path, part: str) -> str:
    files = sorted((folder / part).glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_seeded_variants_are_reproducible_and_distinct(tmp_path: Path) -> None:
    from serve_app.generation.tiny import build_tiny_model

    one = build_tiny_model(tmp_path / "one", "tiny", seed=1)
    again = build_tiny_model(tmp_path / "again", "tiny", seed=1)
    two = build_tiny_model(tmp_path / "two", "tiny", seed=2)
    plain = build_tiny_model(tmp_path / "plain", "tiny")
    assert _digest(one, "unet") == _digest(again, "unet")
    assert len({_digest(one, "unet"), _digest(two, "unet"), _digest(plain, "unet")}) == 3
    # Only the denoiser differs: the text encoder and VAE are the family's own.
    assert _digest(one, "vae") == _digest(two, "vae") == _digest(plain, "vae")


def test_the_app_has_one_deployment_per_pool_and_a_shard_owns_a_whole_pool() -> None:
    from serve_app.builder import build_app
    from serve_app.shards import ShardMap

    registry = {"pools": [pool(max_models_per_replica=2)],
                "models": [model("a", seed=1, pool="shared"), model("solo"),
                           model("b", seed=2, pool="shared")]}
    app = build_app({"models": registry, "tracker_shards": 2,
                     "settings": {"store": "redis", "default_model": "solo"}})
    trackers, shards = app._bound_deployment.init_args[:2]
    assert shards == ShardMap((frozenset({"a", "b"}), frozenset({"solo"})))
    handles = trackers[0]._bound_deployment.init_args[3]
    assert handles["a"] is handles["b"]  # the pool's one deployment
    deployment = handles["a"]._bound_deployment
    assert deployment.name == "pool-shared"
    assert deployment.init_args[0].id == "shared"
    assert [spec.id for spec in deployment.init_args[1]] == ["a", "b"]
    assert deployment._deployment_config.autoscaling_config.max_replicas == 2
    assert deployment._deployment_config.max_ongoing_requests == 1
    solo = trackers[1]._bound_deployment.init_args[3]["solo"]._bound_deployment
    assert solo.name == "model-solo"
