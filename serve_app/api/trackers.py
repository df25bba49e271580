"""The ingress's view of the tracker shards: which one a model's jobs go to, and how the
answers that span shards (GET /models, /metrics) are put together.

With one tracker every call goes to it. With several (`serve_app.shards`), a submit goes to
its model's shard, a job's calls to the shard of the model its stored record names
(`serve_app.api.direct_reads`), and what belongs to no model (the HTTP metrics, per-caller
notes) to the primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from serve_app.api.backend import JobsBackend
from serve_app.errors import JobNotFound, NotThisShard, ServiceError, StoreUnavailable
from serve_app.shards import PRIMARY, ShardMap

T = TypeVar("T")
OTHERS_WAIT_S = 2.0


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
        memory, and the others answer that it is not theirs). The last error if none does."""
        error: ServiceError | None = None
        for tracker in self.all:
            try:
                return await call(tracker)
            except (JobNotFound, NotThisShard, StoreUnavailable) as exc:
                error = exc
        assert error is not None
        raise error

    async def _each(self, call: Callable[[JobsBackend], Awaitable[T]]
                    ) -> list[T | BaseException]:
        """`call` on every tracker at once: each answer or error. A shard other than the
        primary gets `OTHERS_WAIT_S` (a restarting one would hold the whole answer for
        the client's retry window)."""
        async def one(index: int, tracker: JobsBackend) -> T:
            if index == PRIMARY:
                return await call(tracker)
            return await asyncio.wait_for(call(tracker), OTHERS_WAIT_S)

        return await asyncio.gather(*(one(i, t) for i, t in enumerate(self.all)),
                                    return_exceptions=True)

    async def models(self, caller: Any) -> dict[str, Any]:
        """GET /models: each model as the shard that serves it describes it (its replica
        counts are that shard's); models no shard serves as the primary has them. A shard
        that does not answer (restarting) leaves its models as the primary describes them,
        without replica counts; only the primary's failure fails the call."""
        if not self.sharded:
            return await self.primary.models(caller)
        answers = await self._each(lambda t: t.models(caller))
        primary = answers[PRIMARY]
        if isinstance(primary, BaseException):
            raise primary
        models = []
        for entry in primary["models"]:
            owner = answers[self.shards.of(entry["id"])]
            if isinstance(owner, BaseException):
                models.append(entry)
                continue
            models.append(next((m for m in owner["models"] if m["id"] == entry["id"]), entry))
        return {**primary, "models": models}

    async def metrics_text(self, caller: Any) -> bytes:
        """The shards' Prometheus expositions as one, each sample labelled with its
        `shard` (every shard counts only its own models' jobs). A shard that does not
        answer (restarting) is left out of the scrape; only the primary's failure fails
        it (a refusal, e.g. a key that is not an admin's, is every shard's)."""
        if not self.sharded:
            return await self.primary.metrics_text(caller)
        texts = await self._each(lambda t: t.metrics_text(caller))
        if isinstance(texts[PRIMARY], BaseException):
            raise texts[PRIMARY]
        return merge_expositions({i: t for i, t in enumerate(texts)
                                  if not isinstance(t, BaseException)})


def merge_expositions(texts: Mapping[int, bytes]) -> bytes:
    """One exposition of several shards' (same metric families, by shard index), the
    `shard` label telling their samples apart."""
    families: dict[str, Metric] = {}
    for index, text in texts.items():
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
