"""What the dispatch knows of model pools: which models share whose capacity, whose turn it
is among them, and which pool replicas hold which model now.

A pool's models each keep their own queue and lane (only jobs of one model batch
together), but they share the pool's replicas: its calls out and its jobs out
(MAX_CONCURRENT_JOBS) are counted across the pool. When the pool has room, the next call
goes to the model whose turn it is: the highest priority among the models' next jobs
first, and within a priority the models take turns by start-time fair queueing, the rule
`serve_app.jobs.queues` applies to API keys: each call advances its model's tag by one,
and a model that was idle starts at the pool's virtual time (it banks no credit). So a
model with 100 queued jobs gets one call, then each other waiting model gets one, and so
on: a popular model cannot starve the pool's rare ones.

Which replica holds which model comes from the replicas themselves (each call's `Started`
carries its replica's `PoolReport`); a replica a call finds dead holds nothing, and a pool
with no ready replica holds nothing. A replica that goes away between calls (scaled down)
keeps its entry until then: the counts are what the tracker last heard, for GET /models
and a job's `loading_model` phase.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from serve_app.jobs.job import Job
from serve_app.messages import PoolReport


@dataclass
class ModelTurns:
    """Start-time fair queueing of calls across one pool's models, per priority."""

    _virtual: dict[int, float] = field(default_factory=dict)  # rank -> virtual time
    _next: dict[tuple[int, str], float] = field(default_factory=dict)  # (rank, model) -> tag

    def tag(self, model: str, rank: int) -> float:
        return max(self._virtual.get(rank, 0.0), self._next.get((rank, model), 0.0))

    def order(self, leads: Mapping[str, Job]) -> list[str]:
        """The models with a waiting job, the one whose turn it is first."""
        return sorted(leads, key=lambda m: (leads[m].priority.rank,
                                            self.tag(m, leads[m].priority.rank), m))

    def took(self, model: str, rank: int) -> None:
        """`model` sent a call of priority `rank`: its next call comes one turn later."""
        start = self.tag(model, rank)
        self._next[(rank, model)] = start + 1.0
        self._virtual[rank] = start


class PoolView:
    def __init__(self, pool_of: Mapping[str, str]) -> None:
        """`pool_of`: each served pool model's pool (models without one are left out)."""
        self._pool_of = dict(pool_of)
        self._members: dict[str, list[str]] = {}
        for model, pool in self._pool_of.items():
            self._members.setdefault(pool, []).append(model)
        self._turns = {pool: ModelTurns() for pool in self._members}
        self._held: dict[str, dict[str, tuple[str, ...]]] = {p: {} for p in self._members}

    def pool(self, model: str) -> str | None:
        return self._pool_of.get(model)

    def pools(self) -> list[str]:
        return list(self._members)

    def group(self, model: str) -> list[str]:
        """The models that share `model`'s capacity: its pool's, or itself alone."""
        pool = self._pool_of.get(model)
        return list(self._members[pool]) if pool is not None else [model]

    def order(self, model: str, leads: Mapping[str, Job]) -> list[str]:
        pool = self._pool_of.get(model)
        return self._turns[pool].order(leads) if pool is not None else list(leads)

    def took(self, model: str, job: Job) -> None:
        pool = self._pool_of.get(model)
        if pool is not None:
            self._turns[pool].took(model, job.priority.rank)

    # -- which replica holds what ------------------------------------------------------

    def reported(self, model: str, replica: str, report: PoolReport) -> None:
        pool = self._pool_of.get(model)
        if pool is not None:
            self._held[pool][replica.rsplit("#", 1)[-1]] = report.loaded

    def lost(self, model: str, replica: str) -> None:
        """A call on `replica` of `model`'s pool found it dead: it holds nothing now."""
        pool = self._pool_of.get(model)
        if pool is not None:
            self._held[pool].pop(replica.rsplit("#", 1)[-1], None)

    def deployment_ready(self, ready: Mapping[str, int]) -> None:
        """Ready replicas per model now (a pool model's are its pool's): a pool with none
        holds no model."""
        for pool, held in self._held.items():
            if max((ready.get(m, 0) for m in self._members[pool]), default=0) == 0:
                held.clear()

    def holding(self, model: str) -> int:
        """On how many of its pool's replicas `model` is loaded, as last reported."""
        pool = self._pool_of.get(model)
        if pool is None:
            return 0
        return sum(model in loaded for loaded in self._held[pool].values())

    def loaded_counts(self, models: Iterable[str] | None = None) -> dict[str, int]:
        return {m: self.holding(m) for m in (models or self._pool_of)}
