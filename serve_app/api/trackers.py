"""The ingress's tracker shards as one backend: the one place that decides which tracker
answers a call.

Each call of the tracker's interface goes where its `Route` (`serve_app.jobs.interface`)
says: a submit to its model's shard; a job's calls to the shard of the model its stored
record names (asked of the store through `locate`) or, when the store cannot tell (it is
down), to each shard in turn until one knows the job (the shard that runs it has it in
memory; the others answer that it is not theirs); what belongs to no model (the HTTP
metrics, per-caller notes, and with one tracker everything) to the primary; and what spans
shards (GET /models, /metrics) to every shard, put together here. Which models a shard owns
is `serve_app.shards.ShardMap`'s; the trackers themselves refuse a misrouted call
(`ShardMap.check_mine`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from serve_app.api.backend import JobsBackend
from serve_app.errors import JobNotFound, NotThisShard, StoreUnavailable
from serve_app.jobs.interface import CallSpec, Route, derive
from serve_app.jobs.service import TRACKER_CALLS
from serve_app.messages import OPEN, Caller, Submission
from serve_app.shards import PRIMARY, ShardMap

if TYPE_CHECKING:
    from serve_app.jobs.intake import Outcome

T = TypeVar("T")
OTHERS_WAIT_S = 2.0
# A job's model as its stored record names it; JobNotFound for an unknown job (or another
# key's), StoreUnavailable when the store cannot tell.
Locate = Callable[[str, Caller], Awaitable[str]]
# What a misrouted or blind call answers: the next shard may know the job.
_NOT_HERE = (JobNotFound, NotThisShard, StoreUnavailable)


def _route(spec: CallSpec) -> Callable[..., Awaitable[Any]]:
    async def call(self: Trackers, *args: Any, **kwargs: Any) -> Any:
        def on(tracker: JobsBackend) -> Awaitable[Any]:
            return getattr(tracker, spec.name)(*args, **kwargs)

        if spec.route is Route.JOB:
            job_id, caller = _job_of(spec, args, kwargs)
            return await self.on_job(job_id, caller, on)
        if spec.route is Route.MODEL:
            return await on(self.of(_submission_of(spec, args, kwargs).model))
        return await on(self.primary)

    if spec.route is Route.SHARDS:
        raise TypeError(f"Trackers must put every shard's {spec.name} together itself")
    return call


def _route_stream(spec: CallSpec) -> Callable[..., AsyncIterator[Any]]:
    if spec.route is not Route.JOB:
        raise TypeError(f"no routing for the streaming call {spec.name}")

    async def call(self: Trackers, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        job_id, caller = _job_of(spec, args, kwargs)
        candidates = await self.for_job(job_id, caller)
        for tracker in candidates:
            async with aclosing(getattr(tracker, spec.name)(*args, **kwargs)) as items:
                try:
                    first = await anext(items)
                except StopAsyncIteration:
                    return
                except _NOT_HERE:
                    if tracker is candidates[-1]:
                        raise
                    continue
                yield first
                async for item in items:
                    yield item
                return
    return call


def _arguments(spec: CallSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The call's arguments by position, `self` left out."""
    return list(spec.signature.bind(None, *args, **kwargs).arguments.values())[1:]


def _job_of(spec: CallSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Caller]:
    """A job call's `job_id` and `caller` (`Route.JOB` calls name both)."""
    bound = spec.signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments["job_id"], bound.arguments["caller"]


def _submission_of(spec: CallSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> Submission:
    first = _arguments(spec, args, kwargs)[0]
    if isinstance(first, Submission):
        return first
    raise TypeError(f"{spec.name} is routed by its first argument's model, a Submission")


@derive(TRACKER_CALLS, unary=_route, stream=_route_stream)
class Trackers:
    def __init__(self, clients: Sequence[JobsBackend], shards: ShardMap,
                 locate: Locate | None = None) -> None:
        """`clients`: each shard's backend, in `shards`' order. Without `locate`, a job's
        calls go to each shard in turn."""
        if len(clients) != shards.count:
            raise ValueError(f"{len(clients)} tracker clients for {shards.count} shards")
        self.all = tuple(clients)
        self.shards = shards
        self._locate = locate

    @classmethod
    def one(cls, client: JobsBackend, served: frozenset[str] = frozenset()) -> Trackers:
        return cls([client], ShardMap((served,)))

    @property
    def primary(self) -> JobsBackend:
        return self.all[PRIMARY]

    @property
    def sharded(self) -> bool:
        return len(self.all) > 1

    # -- which tracker answers ---------------------------------------------------------

    def of(self, model: str) -> JobsBackend:
        """The tracker that owns `model`'s jobs."""
        return self.all[self.shards.of(model)]

    async def for_job(self, job_id: str, caller: Caller) -> list[JobsBackend]:
        """The tracker of the job's model as its stored record names it (one tracker: it,
        without a store read), or, when the store cannot tell, every tracker to try in
        turn."""
        if not self.sharded:
            return [self.primary]
        if self._locate is None:
            return list(self.all)
        try:
            return [self.of(await self._locate(job_id, caller))]
        except StoreUnavailable:  # (timeouts too) the shard that runs it has it in memory
            return list(self.all)

    async def on_job(self, job_id: str, caller: Caller,
                     call: Callable[[JobsBackend], Awaitable[T]]) -> T:
        """`call` on the job's tracker (`for_job`)."""
        return await self.first(await self.for_job(job_id, caller), call)

    async def first(self, candidates: Sequence[JobsBackend],
                    call: Callable[[JobsBackend], Awaitable[T]]) -> T:
        """`call` on each candidate in turn: the first that knows the job answers, else
        the last one's error."""
        for tracker in candidates[:-1]:
            try:
                return await call(tracker)
            except _NOT_HERE:
                continue
        return await call(candidates[-1])

    async def submit_many(self, subs: Sequence[Submission]) -> list[Outcome]:
        """Each submission to its model's shard; the outcomes in the order given."""
        by_shard: dict[int, list[int]] = {}
        for i, sub in enumerate(subs):
            by_shard.setdefault(self.shards.of(sub.model), []).append(i)
        outcomes: list[Outcome] = [{}] * len(subs)
        answers = await asyncio.gather(*(self.all[shard].submit_many([subs[i] for i in idx])
                                         for shard, idx in by_shard.items()))
        for idx, answer in zip(by_shard.values(), answers, strict=True):
            for i, outcome in zip(idx, answer, strict=True):
                outcomes[i] = outcome
        return outcomes

    # -- what spans shards -------------------------------------------------------------

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

    async def models(self, caller: Caller = OPEN) -> dict[str, Any]:
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

    async def metrics_text(self, caller: Caller = OPEN) -> bytes:
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
