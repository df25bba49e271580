"""The ingress's tracker client: domain errors unwrapped, a dying tracker retried."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from serve_app.api import tracker_client as ingress
from serve_app.api.tracker_client import TrackerClient
from serve_app.errors import JobNotFound, QueueFull, ServiceUnavailable
from serve_app.messages import OPEN, GenerationTask, JobType, Priority, Submission

pytestmark = pytest.mark.anyio


class FakeMethod:
    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]

        async def answer() -> Any:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return answer()


class FakeHandle:
    def __init__(self, **methods: FakeMethod) -> None:
        self.__dict__.update(methods)


def submission() -> Submission:
    task = GenerationTask(job_id="", mode=JobType.TEXT2IMG, prompt="x", negative_prompt="",
                          width=64, height=64, steps=1, guidance_scale=7.5, seed=1,
                          sampler="euler_a")
    return Submission(JobType.TEXT2IMG, "tiny-sd", Priority.NORMAL, {}, task)


async def test_a_retried_submit_carries_one_idempotency_key(monkeypatch) -> None:
    monkeypatch.setattr(ingress, "RETRY_PAUSE_S", 0)
    submit_many = FakeMethod([ActorDiedError(), ActorDiedError(), [{"id": "job_1"}]])
    backend = TrackerClient(FakeHandle(submit_many=submit_many))  # type: ignore[arg-type]
    assert await backend.submit(submission()) == {"id": "job_1"}
    keys = {call[0][0].idempotency_key for call in submit_many.calls}
    assert len(submit_many.calls) == 3 and len(keys) == 1
    assert next(iter(keys)).startswith("auto:")


async def test_concurrent_submits_share_tracker_calls_and_keep_their_own_outcome(
    monkeypatch,
) -> None:
    monkeypatch.setattr(ingress, "SUBMITS_IN_FLIGHT", 1)
    refused = QueueFull("Queue is full", retry_after_s=7)
    submit_many = FakeMethod([[{"id": "job_1"}], [{"id": "job_2"}, refused, {"id": "job_4"}]])
    backend = TrackerClient(FakeHandle(submit_many=submit_many))  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*(backend.submit(submission()) for _ in range(4)),
                                    return_exceptions=True)
    # The first goes alone; the three that arrived while it was out, together.
    assert [len(call[0]) for call in submit_many.calls] == [1, 3]
    assert outcomes[:2] == [{"id": "job_1"}, {"id": "job_2"}] and outcomes[3] == {"id": "job_4"}
    assert outcomes[2] is refused


async def test_a_tracker_that_stays_down_is_a_503_with_retry_after(monkeypatch) -> None:
    monkeypatch.setattr(ingress, "RETRY_PAUSE_S", 0)
    monkeypatch.setattr(ingress, "TRACKER_RESTART_S", 0)
    backend = TrackerClient(FakeHandle(get=FakeMethod([ActorDiedError()])))  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable) as exc:
        await backend.get("job_1", OPEN)
    assert exc.value.retry_after_s >= 1


async def test_domain_errors_from_the_tracker_are_unwrapped() -> None:
    wrapped = RayTaskError("get", "traceback", JobNotFound())
    backend = TrackerClient(FakeHandle(get=FakeMethod([wrapped])))  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        await backend.get("job_1", OPEN)
