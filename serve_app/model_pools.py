"""Model pool entries of the registry (`pools:`): one deployment whose replicas load the
pool's models on demand (Serve's model multiplexing). Torch-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from serve_app.model_runtime import Resources, Scaling, Strict


class PoolSpec(Strict):
    """A model pool (`pools:`): one deployment (`pool-<id>`) whose replicas load the pool's
    models on demand through Serve's model multiplexing and keep the most recently used."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str = ""
    # Models one replica keeps loaded; the least recently used goes when another loads.
    max_models_per_replica: int = Field(3, ge=1, le=1000)
    # Optional memory budget: with `model_memory_gb` (one loaded model's footprint), a
    # replica keeps at most floor(budget / footprint) models, if fewer than the count.
    memory_budget_gb: float | None = Field(None, gt=0)
    model_memory_gb: float | None = Field(None, gt=0)
    # LoRA folders every model of the pool takes (beside each model's own lora_dirs).
    lora_dirs: tuple[str, ...] = ()
    scaling: Scaling = Scaling()
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _budget(self) -> PoolSpec:
        if (self.memory_budget_gb is None) != (self.model_memory_gb is None):
            raise ValueError("memory_budget_gb and model_memory_gb go together: the budget "
                             "is counted in models of that size")
        if self.memory_budget_gb is not None and self.models_per_replica < 1:
            raise ValueError(f"memory_budget_gb {self.memory_budget_gb:g} does not hold one "
                             f"model of model_memory_gb {self.model_memory_gb:g}")
        return self

    @property
    def models_per_replica(self) -> int:
        """How many models a replica keeps loaded: the count, or fewer if the budget says."""
        if self.memory_budget_gb is None or self.model_memory_gb is None:
            return self.max_models_per_replica
        fits = int(self.memory_budget_gb / self.model_memory_gb + 1e-9)
        return min(self.max_models_per_replica, fits)


def pool_lora_dirs(models: Any, pools: Any) -> Any:
    """Raw registry models with each pool model given its pool's `lora_dirs` after its own."""
    if not isinstance(models, list) or not isinstance(pools, list):
        return models
    dirs = {p.get("id"): p.get("lora_dirs") for p in pools if isinstance(p, dict)}
    out = []
    for m in models:
        extra = dirs.get(m.get("pool")) if isinstance(m, dict) else None
        if isinstance(extra, list) and extra and isinstance(m.get("lora_dirs", []), list):
            m = {**m, "lora_dirs": list(m.get("lora_dirs", [])) + extra}
        out.append(m)
    return out
