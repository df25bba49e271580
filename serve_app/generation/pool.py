"""One pool replica's loaded models: what `deployments.model.PoolReplica` keeps beside Ray
Serve's own multiplexing LRU, which decides what stays loaded.

Plain Python, testable without Ray. Serve's `@serve.multiplexed` holds each loaded model
(a `PooledModel`) and, to load one more past `max_num_models_per_replica`, first evicts the
least recently used by calling its `__del__`. Only references free memory in Python, so
`PooledModel.release` drops every reference it holds to its runner (the pipelines, their
LoRAs, prompt caches), collects the cycles those objects hold, and on CUDA hands the
cached blocks back to the driver (`torch.cuda.empty_cache`): what the replica's RSS and
the GPU's memory show afterwards is what the remaining models use (tests/unit/
test_pool_replica.py checks the pipeline is gone; tests/e2e/test_e2e_pools.py measures RSS).

`PoolLedger` mirrors the LRU for reports: which models are loaded, how long the last load
took, and what was evicted since the last report (the tracker counts loads, hits and
evictions from these, `serve_app.messages.PoolReport`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

from serve_app.messages import PoolReport

log = logging.getLogger(__name__)


class PoolLedger:
    """Which models a pool replica holds, in load order, and what it evicted lately."""

    def __init__(self) -> None:
        self._loaded: dict[str, float] = {}  # model -> its load's seconds
        self._evicted: list[str] = []

    def holds(self, model_id: str) -> bool:
        return model_id in self._loaded

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def added(self, model_id: str, load_s: float) -> None:
        self._loaded[model_id] = load_s

    def released(self, model_id: str) -> None:
        if self._loaded.pop(model_id, None) is not None:
            self._evicted.append(model_id)

    def report(self, model_id: str, fresh: bool) -> PoolReport:
        """The report for a call of `model_id` (`fresh`: the call loaded it); it takes
        the evictions noted since the last report."""
        evicted, self._evicted = tuple(self._evicted), []
        load_s = self._loaded.get(model_id) if fresh else None
        return PoolReport(loaded=self.loaded, load_s=load_s, evicted=evicted)


class PooledModel:
    """One model loaded on a pool replica: its worker (`ModelWorker` over a runner).
    `release()` frees it, once; Serve calls `__del__` when it evicts the model."""

    def __init__(self, model_id: str, worker: Any, on_release: Callable[[str], None]) -> None:
        self.model_id = model_id
        self._worker: Any = worker
        self._on_release = on_release

    @property
    def worker(self) -> Any:
        if self._worker is None:
            raise RuntimeError(f"model {self.model_id} was evicted from this replica")
        return self._worker

    def release(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        runner = worker.runner
        worker.runner = None
        del worker
        close = getattr(runner, "close", None)
        if close is not None:
            close()
        del runner, close
        gc.collect()
        _empty_cuda_cache()
        self._on_release(self.model_id)
        log.info("evicted model %s", self.model_id)

    def __del__(self) -> None:
        self.release()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
