"""Webhooks of jobs: which events are sent, retries with backoff until a deadline, delivery
state in the record, durability across a restart, and the whole path over HTTP to a real
receiver that verifies signatures with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.api.wire import JobRecord, WebhookBody
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.jobs.service import JobTracker
from serve_app.messages import GenerationTask, Progress, ReplicaEvent, Submission
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.shards import ShardMap
from serve_app.stores.sqlite import SQLiteStore
from tests.support.client_server import live_server
from tests.support.fakes import FakeReplicas
from tests.support.trackers import make_tracker, record
from tests.support.trackers import submission as small_job
from tests.support.virtual_time import run_virtual
from tests.support.webhook_receiver import (
    SECRET,
    ScriptedSender,
    body_of,
    hook_settings,
    receiver,
)

TARGET = "https://hooks.example.com/imagegen"


def submission(registry: Registry, settings: Settings, url: str = TARGET,
               **body: Any) -> Submission:
    """A small job with a webhook to `url`."""
    return small_job(registry, settings, webhook=url, base_url="http://gen.test", **body)


def loop_clock() -> Any:
    loop = asyncio.get_running_loop()
    return lambda: int(loop.time() * 1000)


def find(rec: dict[str, Any], event: str) -> dict[str, Any] | None:
    return next((d for d in rec["webhook"]["deliveries"] if d["event"] == event), None)


def outcomes(tracker: JobTracker) -> dict[str, float]:
    """imagegen_webhook_deliveries_total by outcome, as Prometheus would scrape it."""
    found = {}
    for outcome in ("delivered", "retried", "failed", "dropped"):
        value = tracker.metrics.registry.get_sample_value(
            "imagegen_webhook_deliveries_total", {"outcome": outcome})
        if value:
            found[outcome] = value
    return found


def delivery(rec: dict[str, Any], event: str) -> dict[str, Any]:
    found = find(rec, event)
    assert found is not None, rec["webhook"]
    return found


# -- in virtual time -----------------------------------------------------------------------


def test_failed_attempts_back_off_exponentially_with_jitter_until_the_deadline(
        registry, settings) -> None:
    async def main() -> None:
        clock = loop_clock()
        sender = ScriptedSender(clock, script=[503] * 100)
        s = hook_settings(settings, webhook_retry_base_s=1.0, webhook_retry_max_s=8.0,
                          webhook_deadline_s=60)
        tracker = make_tracker(registry, s, FakeReplicas(), clock=clock, webhook_sender=sender)
        job = await tracker.submit(submission(registry, s))
        await asyncio.sleep(120)
        times = [at for at, _, _ in sender.sent]
        created = times[0]
        for n, (before, after) in enumerate(pairwise(times), start=1):
            step = min(8000, 1000 * 2 ** (n - 1))
            assert step // 2 <= after - before <= step, (n, after - before)
        assert times[-1] <= created + 60_000 < times[-1] + 8000
        assert len(times) >= 9
        assert outcomes(tracker) == {"retried": len(times) - 1, "failed": 1}
        assert {h["webhook-id"] for _, h, _ in sender.sent} == {
            f"msg_{job['id'].removeprefix('job_')}_completed"}
        assert len({b for _, _, b in sender.sent}) == 1  # the same body every time
        rec = await record(tracker, job["id"])
        assert delivery(rec, "completed") == {
            "event": "completed", "id": sender.sent[0][1]["webhook-id"], "status": "failed",
            "attempts": len(times), "lastStatus": 503}
        JobRecord.model_validate(rec)
        await tracker.close()

    run_virtual(main())


class SlowReplicas(FakeReplicas):
    """0.6 s between denoising steps."""

    async def run(self, model_id: str, tasks: list[GenerationTask]
                  ) -> AsyncIterator[ReplicaEvent]:
        async for event in super().run(model_id, tasks):
            yield event
            if isinstance(event, Progress):
                await asyncio.sleep(0.6)


def test_started_progress_at_most_once_a_second_and_completed(registry, settings) -> None:
    async def main() -> None:
        clock = loop_clock()
        sender = ScriptedSender(clock, script=["connection refused"])  # the first fails
        s = hook_settings(settings, webhook_retry_base_s=0.1)
        tracker = make_tracker(registry, s, SlowReplicas(), clock=clock, webhook_sender=sender)
        job = await tracker.submit(submission(
            registry, s, steps=10, webhookEvents=["started", "progress", "completed"]))
        await asyncio.sleep(10)
        bodies = [json.loads(body) for _, _, body in sender.sent]
        # started failed once and was retried; progress every other 0.6 s step; completed.
        assert [(b["event"], b["progress"]) for b in bodies] == [
            ("started", 0), ("progress", 10), ("started", 0), ("progress", 30),
            ("progress", 50), ("progress", 70), ("progress", 90), ("completed", 100)]
        progress_times = [at for (at, _, _), b in zip(sender.sent, bodies, strict=True)
                          if b["event"] == "progress"]
        assert all(b - a >= 1000 for a, b in pairwise(progress_times))
        rec = await record(tracker, job["id"])
        assert [(d["event"], d["status"], d["attempts"]) for d in rec["webhook"]["deliveries"]
                ] == [("started", "delivered", 2), ("progress", "delivered", 1),
                      ("completed", "delivered", 1)]
        assert delivery(rec, "started")["lastStatus"] == 200
        assert outcomes(tracker) == {"retried": 1, "delivered": 7}
        assert delivery(rec, "progress")["id"].endswith("_progress_90")
        assert bodies[-1]["result"]["images"] == [f"http://gen.test/jobs/{job['id']}/images/0"]
        WebhookBody.model_validate(bodies[-1])
        await tracker.close()

    run_virtual(main())


def test_failed_and_cancelled_jobs_are_sent_by_default_and_started_is_not(
        registry, settings) -> None:
    async def main() -> None:
        clock = loop_clock()
        sender = ScriptedSender(clock)
        s = hook_settings(settings)
        hold = asyncio.Event()
        tracker = make_tracker(registry, s, FakeReplicas(hold=hold, explode="out of memory"),
                               clock=clock, webhook_sender=sender)
        failing = await tracker.submit(submission(registry, s))
        waiting = await tracker.submit(submission(registry, s, seed=8))
        await tracker.cancel(waiting["id"])
        await asyncio.sleep(1)
        assert sorted(sender.events()) == ["cancelled", "failed"]
        by_event = {json.loads(b)["event"]: json.loads(b) for _, _, b in sender.sent}
        assert by_event["failed"]["id"] == failing["id"]
        assert by_event["failed"]["error"].startswith("Generation failed")
        assert by_event["cancelled"]["id"] == waiting["id"]
        assert by_event["cancelled"]["status"] == "cancelled"
        await tracker.close()

    run_virtual(main())


# -- with real time and I/O ----------------------------------------------------------------


async def wait_until(check: Any, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


async def pending_delivery(registry: Registry, s: Settings, path: Path, tries: int
                           ) -> tuple[dict[str, Any], ScriptedSender]:
    """A job completed by a tracker on the SQLite file at `path` whose receiver refused
    its webhook `tries` times, then the tracker stopped: the delivery is stored pending."""
    sender = ScriptedSender(time.time, script=[503] * 1000)
    tracker = make_tracker(registry, s, FakeReplicas(),
                           store=InlineStoreCalls(SQLiteStore(path)), webhook_sender=sender)
    await tracker.start()
    job = await tracker.submit(submission(registry, s))
    await wait_until(lambda: _true(len(sender.sent) >= tries))
    await tracker.close()  # saves the delivery as pending
    return job, sender


@pytest.mark.anyio
async def test_a_restarted_tracker_resumes_a_pending_delivery_with_the_same_id(
        registry, settings, tmp_path: Path) -> None:
    s = hook_settings(settings, webhook_retry_base_s=0.05)
    path = tmp_path / "jobs.sqlite3"
    job, first = await pending_delivery(registry, s, path, tries=2)
    tried = delivery(await _stored(path, job["id"]), "completed")
    assert tried["status"] == "pending" and tried["attempts"] >= 2

    second = ScriptedSender(time.time)
    tracker = make_tracker(registry, s, FakeReplicas(),
                           store=InlineStoreCalls(SQLiteStore(path)), webhook_sender=second)
    await tracker.start()
    done = await wait_until(lambda: _delivered(tracker, job["id"]))
    assert done["attempts"] == tried["attempts"] + 1 and done["lastStatus"] == 200
    assert second.sent[0][1]["webhook-id"] == first.sent[0][1]["webhook-id"] == tried["id"]
    assert second.sent[0][2] == first.sent[0][2]  # the same body
    assert second.sent[0][1]["webhook-signature"] != first.sent[0][1]["webhook-signature"] or (
        second.sent[0][1]["webhook-timestamp"] == first.sent[0][1]["webhook-timestamp"])
    await tracker.book.writes.flush()
    assert tracker.book.calls.store.webhooks_pending() == []  # nothing left to resume
    await tracker.close()


@pytest.mark.anyio
async def test_a_tracker_shard_resumes_only_its_own_models_deliveries(
        registry, settings, tmp_path: Path) -> None:
    """Two shards on one store: a pending delivery of a tiny-sd job is shard 0's to send;
    shard 1 (tiny-sd-inpaint) must not send it too."""
    s = hook_settings(settings, webhook_retry_base_s=0.05)
    path = tmp_path / "jobs.sqlite3"
    job, _ = await pending_delivery(registry, s, path, tries=1)
    assert job["model"] == "tiny-sd"

    shards = ShardMap((frozenset({"tiny-sd"}), frozenset({"tiny-sd-inpaint"})))
    senders = [ScriptedSender(time.time), ScriptedSender(time.time)]
    trackers = [make_tracker(registry, s, FakeReplicas(),
                             store=InlineStoreCalls(SQLiteStore(path)),
                             served=shards.shards[i], webhook_sender=senders[i],
                             shards=shards, shard=i)
                for i in (1, 0)]  # the other shard starts first
    for t in trackers:
        await t.start()
    await wait_until(lambda: _delivered(trackers[1], job["id"]))
    await asyncio.sleep(0.3)  # time enough for a second sender's retries
    assert (len(senders[0].sent), len(senders[1].sent)) == (1, 0)
    for t in trackers:
        await t.close()


@pytest.mark.anyio
async def test_a_job_that_ran_at_a_restart_keeps_one_state_for_its_webhooks(
        registry, settings, tmp_path: Path) -> None:
    """A job resumed by the restart is the tracker's own object, and the resumed delivery
    must change that one: otherwise its later saves would bring `pending` back."""
    s = hook_settings(settings, webhook_retry_base_s=0.05)
    path = tmp_path / "jobs.sqlite3"
    first = ScriptedSender(time.time, script=[503] * 1000)
    tracker = make_tracker(registry, s, FakeReplicas(hold=asyncio.Event()),
                           store=InlineStoreCalls(SQLiteStore(path)),
                           webhook_sender=first)
    await tracker.start()
    job = await tracker.submit(submission(registry, s, webhookEvents=["started", "completed"]))
    await wait_until(lambda: _true(len(first.sent) >= 1))
    await tracker.close()  # it was running: the next start runs it again

    second = ScriptedSender(time.time)
    tracker = make_tracker(registry, s, FakeReplicas(),
                           store=InlineStoreCalls(SQLiteStore(path)), webhook_sender=second)
    await tracker.start()
    # Both: the resumed `started` keeps the backoff the first tracker gave it, so
    # `completed` may well be delivered first.
    await wait_until(lambda: _all_delivered(tracker, job["id"]))
    await tracker.book.writes.flush()
    stored = await _stored(path, job["id"])
    assert [(d["event"], d["status"]) for d in stored["webhook"]["deliveries"]] == [
        ("started", "delivered"), ("completed", "delivered")]
    assert sorted(second.events()) == ["completed", "started"]  # each once; order not kept
    assert tracker.book.calls.store.webhooks_pending() == []
    await tracker.close()


async def _true(value: bool) -> bool:
    return value


async def _stored(path: Path, job_id: str) -> dict[str, Any]:
    from serve_app.jobs.codec import loads

    store = SQLiteStore(path)
    try:
        text = store.load(job_id)
        assert text is not None
        return loads(text).to_wire()
    finally:
        store.close()


async def _all_delivered(tracker: JobTracker, job_id: str) -> bool:
    deliveries = (await record(tracker, job_id))["webhook"]["deliveries"]
    return len(deliveries) == 2 and all(d["status"] == "delivered" for d in deliveries)


async def _delivered(tracker: JobTracker, job_id: str) -> dict[str, Any] | None:
    found = find(await record(tracker, job_id), "completed")
    return found if found is not None and found["status"] == "delivered" else None


@pytest.mark.anyio
async def test_a_tracker_without_a_secret_gives_up_saying_why(registry, settings) -> None:
    sender = ScriptedSender(time.time)
    tracker = make_tracker(registry, settings, FakeReplicas(), webhook_sender=sender)
    job = await tracker.submit(submission(registry, hook_settings(settings)))
    failed = await wait_until(lambda: _given_up(tracker, job["id"]))
    assert "WEBHOOK_SECRET is not set" in failed["lastError"] and sender.sent == []
    await tracker.close()


async def _given_up(tracker: JobTracker, job_id: str) -> dict[str, Any] | None:
    found = find(await record(tracker, job_id), "completed")
    return found if found is not None and found["status"] == "failed" else None


def test_over_http_a_refused_webhook_is_retried_and_verifies(registry, settings) -> None:
    """The whole path: POST with a webhook to the API; a real receiver on loopback refuses
    the first two attempts (500) and verifies every signature; the record shows it."""
    s = hook_settings(settings, webhook_retry_base_s=0.05)
    with live_server(registry, s) as server, receiver(script=[500, 500]) as rx, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        resp = client.post("/generate/text2img", json={
            "prompt": "a lake", "width": 64, "height": 64, "steps": 2, "webhook": rx.url})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert resp.json()["webhook"] == {"url": rx.url, "events": [
            "completed", "failed", "cancelled"], "deliveries": []}
        got = rx.wait_for(3)
        assert [r.answered for r in got] == [500, 500, 200]
        assert all(r.error is None for r in got)  # every attempt verified
        assert len({r.headers["webhook-id"] for r in got}) == 1
        body = body_of(got[-1])
        assert got[-1].verified == body and body["event"] == "completed"
        assert (body["id"], body["status"]) == (job_id, "completed")
        image_url = f"{server.url}/jobs/{job_id}/images/0"
        assert body["result"]["images"] == [image_url]
        image = client.get(image_url)
        assert image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
        WebhookBody.model_validate(body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rec = client.get(f"/jobs/{job_id}").json()
            if rec["webhook"]["deliveries"][0]["status"] == "delivered":
                break
            time.sleep(0.02)
        assert rec["webhook"]["deliveries"] == [{
            "event": "completed", "id": got[0].headers["webhook-id"], "status": "delivered",
            "attempts": 3, "lastStatus": 200}]
        JobRecord.model_validate(rec)
        assert SECRET not in json.dumps(rec) and SECRET.removeprefix("whsec_") not in str(got)
