"""What the dispatch works with: a replica call and how it ended, the replicas it reaches
(a `Protocol`, so tests drive it with scripted replicas), what it reports of calls, and
its limits. Plain data and interfaces; `serve_app.jobs.dispatch` does the moving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from serve_app.jobs.job import Job
from serve_app.messages import GenerationTask, PoolReport, ReplicaEvent


class Replicas(Protocol):
    """How tasks reach a model's replicas. Closing the stream early must cancel the call
    (and so interrupt the pipeline); a dead replica raises `ReplicaLost`."""

    def run(self, model_id: str, tasks: list[GenerationTask]) -> AsyncIterator[ReplicaEvent]:
        ...

    async def replica_states(self) -> dict[str, dict[str, int]]:
        """Per model: how many replicas are `ready` and how many `starting`."""
        ...


class Observer(Protocol):
    """What the dispatch reports of calls (the metrics)."""

    def call_admitted(self, model: str, jobs: int) -> None: ...
    def call_started(self, model: str, cold: bool, waited_s: float) -> None: ...
    def step(self, model: str) -> None: ...
    def pool_call(self, pool: str, model: str, report: PoolReport) -> None: ...


class Unobserved:
    """No metrics: what the dispatch reports goes nowhere (tests, tools)."""

    def call_admitted(self, model: str, jobs: int) -> None:
        pass

    def call_started(self, model: str, cold: bool, waited_s: float) -> None:
        pass

    def step(self, model: str) -> None:
        pass

    def pool_call(self, pool: str, model: str, report: PoolReport) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    """How a call's stream ended, for the jobs it still holds: `lost` ones may run again."""

    lost: bool
    reason: str


@dataclass(eq=False)
class Call:
    """One replica call: the jobs admitted together, and those of them not yet settled."""

    model: str
    jobs: list[Job]
    tasks: list[GenerationTask]
    open: dict[str, Job]
    admitted_at: float = 0.0  # loop time
    cold: bool = False  # admitted while the model had no ready replica
    started: bool = False
    replica: str | None = None  # the replica that started it
    outcome: Outcome | None = None
    task: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class Limits:
    """JOB_TIMEOUT, in seconds, and how many attempts a job gets (MAX_ATTEMPTS)."""

    timeout_s: float
    max_attempts: int
