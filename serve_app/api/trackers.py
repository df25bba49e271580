"""The ingress's view of the tracker shards: which one a model's jobs go to, and how the
answers that span shards (GET /models, /metrics) are put together.

With one tracker every call goes to it. With several (`serve_app.shards`), a submit goes to
its model's shard, a job's calls to the shard of the model its stored record names
(`serve_app.api.direct_reads`), and what belongs to no model (the HTTP metrics, per-caller
notes) to the primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from serve_app.api.backend import JobsBackend
from serve_app.errors import JobNotFound, ServiceError, StoreUnavailable
from serve_app.shards import PRIMARY, ShardMap

T = TypeVar("T")


class Trackers:
    def __init__(self, clients: Sequence[JobsBackend], shards: ShardMap) -> None:
        if len(clients) != shards.count:
            raise ValueError(f"{len(clients)} tracker clients for {shards.count} shards")
        self.all = tuple(clients)
        self.shards = shards

    @classmethod
    def one(cls, client: JobsBackend, served: frozenset[str] = frozenset()) -> Trackers:
        return cls([client], ShardMap((served,)))

    @property
    def primary(self) -> JobsBackend:
        return self.all[PRIMARY]

    @property
    def sharded(self) -> bool:
        return len(self.all) > 1

    def of(self, model: str) -> JobsBackend:
        """The tracker that owns `model`'s jobs."""
        return self.all[self.shards.of(model)]

    async def first(self, call: Callable[[JobsBackend], Awaitable[T]]) -> T:
        """`call` on each tracker in turn until one knows the job: for a job whose model
        the store could not tell (it is down; the tracker that runs the job has it in
        memory). The last error if none does."""
        error: ServiceError | None = None
        for tracker in self.all:
            try:
                return await call(tracker)
            except (JobNotFound, StoreUnavailable) as exc:
                error = exc
        assert error is not None
        raise error

    async def models(self, caller: Any) -> dict[str, Any]:
        """GET /models: each model as the shard that serves it describes it (its replica
        counts are that shard's); models no shard serves as the primary has them."""
        answers = await asyncio.gather(*(t.models(caller) for t in self.all))
        models = []
        for entry in answers[PRIMARY]["models"]:
            owner = answers[self.shards.of(entry["id"])]
            models.append(next((m for m in owner["models"] if m["id"] == entry["id"]), entry))
        return {**answers[PRIMARY], "models": models}

    async def metrics_text(self, caller: Any) -> bytes:
        """The shards' Prometheus expositions as one, each sample labelled with its
        `shard` (every shard counts only its own models' jobs)."""
        texts = await asyncio.gather(*(t.metrics_text(caller) for t in self.all))
        if not self.sharded:
            return texts[0]
        return merge_expositions(texts)


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """One exposition of several processes' (same metric families), the `shard` label
    telling their samples apart."""
    families: dict[str, Metric] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels,
                                                              "shard": str(index)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
