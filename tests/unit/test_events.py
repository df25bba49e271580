"""Pushed event streams: a job's change reaches its stream within ~100 ms, listeners of one
job share one subscription, the stream closes after the final record."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from serve_app.api.events import Subscriptions
from serve_app.messages import (
    OPEN,
    Progress,
    Started,
)
from tests.support.client_server import live_server
from tests.support.fakes import FakeReplicas, finished
from tests.support.trackers import CountedTracker, make_tracker, submission


class Stepped(FakeReplicas):
    """A replica that makes one step each time `step` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.step = asyncio.Event()

    async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
        yield Started("r")
        steps = tasks[0].steps
        for n in range(1, steps + 1):
            await self.step.wait()
            self.step.clear()
            yield Progress(n, steps)
        for t in tasks:
            yield finished(t, [b"x"])


@pytest.mark.anyio
async def test_changes_are_pushed_within_100_ms_and_listeners_share_a_subscription(
        registry, settings) -> None:
    replicas = Stepped()
    tracker = make_tracker(registry, settings, replicas)
    backend = CountedTracker(tracker)
    subs = Subscriptions(backend)
    job = await tracker.submit(submission(registry, settings, steps=4))
    seen: dict[str, list[tuple[float, dict[str, Any]]]] = {"a": [], "b": []}

    async def listen(name: str) -> None:
        async for record in subs.listen(job["id"], OPEN):
            seen[name].append((time.monotonic(), json.loads(record)))

    listeners = [asyncio.create_task(listen(n)) for n in seen]
    await asyncio.sleep(0.05)
    assert backend.calls["watch"] == 1 and subs.open == 1 and tracker._feeds.watched == 1
    lags = []
    for _ in range(4):
        stepped = time.monotonic()
        replicas.step.set()
        for _ in range(40):  # until both listeners have the new progress
            await asyncio.sleep(0.005)
            if all(len(s) and s[-1][0] > stepped for s in seen.values()):
                break
        lags += [s[-1][0] - stepped for s in seen.values()]
    await asyncio.wait_for(asyncio.gather(*listeners), 2)
    assert max(lags) < 0.1, lags
    for records in seen.values():
        progress = [r["progress"] for _, r in records]
        assert progress == sorted(progress) and progress[-1] == 100
        assert records[-1][1]["status"] == "completed" and "images" not in records[-1][1]["result"]
    assert subs.open == 0 and tracker._feeds.watched == 0  # nothing left behind
    await tracker.close()


def test_a_standard_sse_client_follows_a_job_to_its_end(registry, settings) -> None:
    with (live_server(registry, settings, hold=True) as live,
          httpx.Client(base_url=live.url, timeout=10) as client):
        job = client.post("/generate/text2img", json={
            "prompt": "p", "steps": 5, "width": 64, "height": 64}).json()
        statuses, progress, ids = [], [], []
        with connect_sse(client, "GET", f"/jobs/{job['id']}/events") as source:
            for event in source.iter_sse():
                assert event.event == "job" and event.id
                record = json.loads(event.data)
                statuses.append(record["status"])
                progress.append(record["progress"])
                ids.append(event.id)
                if record["status"] == "processing":
                    live.release()  # the held job goes on after its first step
        # The iteration ended: the server closed the stream after the final record.
    assert statuses[-1] == "completed" and progress[-1] == 100
    assert "processing" in statuses and progress == sorted(progress)
    assert len(set(ids)) == len(ids)


def test_a_key_holds_at_most_its_cap_of_streams_and_a_slot_is_released_once() -> None:
    from serve_app.api.events import StreamSlots
    from serve_app.errors import RateLimited

    slots = StreamSlots(cap=2)
    first, second = slots.take("ana"), slots.take("ana")
    other = slots.take("bo")  # another key's streams are its own
    with pytest.raises(RateLimited, match="IMAGEGEN_MAX_STREAMS_PER_KEY is 2") as refused:
        slots.take("ana")
    assert refused.value.retry_after_s == 5 and slots.held("ana") == 2
    with first:
        pass
    first.release()  # a second release (a stream closed twice) gives back nothing more
    assert (slots.held("ana"), slots.held("bo")) == (1, 1)
    with slots.take("ana"):  # the freed slot is taken again
        assert slots.held("ana") == 2
    second.release()
    other.release()
    assert (slots.held("ana"), slots.held("bo")) == (0, 0)


def test_a_stream_that_fails_releases_its_slot() -> None:
    from serve_app.api.events import StreamSlots

    slots = StreamSlots(cap=1)
    with pytest.raises(RuntimeError), slots.take("ana"):
        raise RuntimeError("the tracker went away")
    assert slots.held("ana") == 0


class TwoPasses(Stepped):
    """A hires job's replica: after its first step, the rest are the second pass's."""

    async def run(self, model_id, tasks):  # type: ignore[no-untyped-def]
        yield Started("r")
        for n, phase in ((1, ""), (2, "hires")):
            await self.step.wait()
            self.step.clear()
            yield Progress(n, 3, phase=phase)
        await self.step.wait()
        for t in tasks:
            yield finished(t, [b"x"])


@pytest.mark.anyio
async def test_a_hires_jobs_record_names_the_pass_it_is_in(registry, settings) -> None:
    replicas = TwoPasses()
    tracker = make_tracker(registry, settings, replicas)
    job = await tracker.submit(submission(registry, settings, hires={"scale": 2}))

    async def after_step(progress: int) -> dict[str, Any]:
        replicas.step.set()
        for _ in range(500):  # until the tracker has it (no timing assumed)
            record: dict[str, Any] = json.loads(await tracker.get(job["id"], limited=False))
            if record["progress"] == progress:
                return record
            await asyncio.sleep(0.01)
        raise AssertionError(f"progress never reached {progress}: {record}")

    first = await after_step(33)
    assert (first["status"], first["phase"], first["progress"]) == ("processing",
                                                                    "generating", 33)
    second = await after_step(66)
    assert (second["phase"], second["progress"]) == ("hires", 66)
    replicas.step.set()
    await tracker.close()
