"""The ingress's handle backend: domain errors unwrapped, a dying tracker retried."""

from __future__ import annotations

from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from deployments import ingress
from deployments.ingress import HandleBackend
from serve_app.errors import JobNotFound, ServiceUnavailable
from serve_app.schemas import GenerationTask, JobType, Priority, Submission

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
    submit = FakeMethod([ActorDiedError(), ActorDiedError(), {"id": "job_1"}])
    backend = HandleBackend(FakeHandle(submit=submit))  # type: ignore[arg-type]
    assert await backend.submit(submission()) == {"id": "job_1"}
    keys = {call[0].idempotency_key for call in submit.calls}
    assert len(submit.calls) == 3 and len(keys) == 1 and next(iter(keys)).startswith("auto:")


async def test_a_tracker_that_stays_down_is_a_503_with_retry_after(monkeypatch) -> None:
    monkeypatch.setattr(ingress, "RETRY_PAUSE_S", 0)
    monkeypatch.setattr(ingress, "TRACKER_RESTART_S", 0)
    backend = HandleBackend(FakeHandle(get=FakeMethod([ActorDiedError()])))  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable) as exc:
        await backend.get("job_1")
    assert exc.value.retry_after_s >= 1


async def test_domain_errors_from_the_tracker_are_unwrapped() -> None:
    wrapped = RayTaskError("get", "traceback", JobNotFound())
    backend = HandleBackend(FakeHandle(get=FakeMethod([wrapped])))  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        await backend.get("job_1")
