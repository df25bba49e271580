from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from serve_app.api.submission import build_submission
from serve_app.errors import JobNotCancellable, JobNotFound, QueueFull
from serve_app.jobs.job import JobStatus
from serve_app.messages import JobType
from tests.support.fakes import FakeClock, FakeReplicas, fake_image, memory_store, shared_blobs
from tests.support.trackers import SERVED, batching_registry, record, settle, submission
from tests.support.virtual_time import VIRTUAL_TIME

pytestmark = pytest.mark.anyio


async def test_a_submitted_job_runs_to_completion_with_its_images(
        new_tracker, registry, settings) -> None:
    clock = FakeClock()
    tracker = new_tracker(FakeReplicas(), clock=clock)
    sub = submission(registry, settings, numImages=2)
    queued = await tracker.submit(sub)
    assert (queued["status"], queued["progress"], queued["type"]) == ("queued", 0, "text2img")
    await settle()
    done = await record(tracker, queued["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    result = done["result"]
    assert result["seed"] == 7 and result["seeds"] == [7, 8]
    decoded = [base64.b64decode(uri.split(",", 1)[1]) for uri in result["images"]]
    assert decoded == [fake_image(sub.task, 7), fake_image(sub.task, 8)]
    assert result["parameters"]["model"] == "tiny-sd"
    assert result["parameters"]["steps"] == 3 and result["parameters"]["sampler"] == "ddim"
    # The tracker's own record and image calls carry references, never image bytes.
    own = json.loads(await tracker.get(queued["id"]))["result"]["images"]
    second = fake_image(sub.task, 8)
    assert own[1] == {"key": f"jobs/{queued['id']}/out/1.png", "contentType": "image/png",
                      "bytes": len(second), "width": 64, "height": 64,
                      "sha256": hashlib.sha256(second).hexdigest()}
    assert await tracker.image(queued["id"], 1) == own[1]
    assert shared_blobs().get(own[1]["key"]) == second


async def test_higher_priority_overtakes_jobs_queued_before_it(
        new_tracker, registry, settings) -> None:
    hold = asyncio.Event()
    dispatcher = FakeReplicas(hold=hold)
    tracker = new_tracker(dispatcher)
    first = await tracker.submit(submission(registry, settings))
    await settle()
    low1 = await tracker.submit(submission(registry, settings, priority="low"))
    low2 = await tracker.submit(submission(registry, settings, priority="low"))
    high = await tracker.submit(submission(registry, settings, priority="high"))
    assert (await record(tracker, low1["id"]))["queuePosition"] == 2
    assert (await record(tracker, high["id"]))["queuePosition"] == 1
    hold.set()
    for _ in range(10):
        await settle()
    order = [task.job_id for _, task in dispatcher.calls]
    assert order == [first["id"], high["id"], low1["id"], low2["id"]]


async def test_cancelling_a_queued_job_removes_it_at_once(new_tracker, registry, settings) -> None:
    hold = asyncio.Event()
    dispatcher = FakeReplicas(hold=hold)
    tracker = new_tracker(dispatcher)
    await tracker.submit(submission(registry, settings))
    await settle()
    waiting = await tracker.submit(submission(registry, settings))
    assert (await tracker.cancel(waiting["id"]))["success"] is True
    assert (await record(tracker, waiting["id"]))["status"] == "cancelled"
    hold.set()
    await settle()
    assert waiting["id"] not in [t.job_id for _, t in dispatcher.calls]
    # Cancelling it again answers the same (a retried cancel is safe); a completed job
    # cannot be cancelled.
    assert (await tracker.cancel(waiting["id"]))["status"] == "cancelled"
    done = (await tracker.list_jobs(status=JobStatus.COMPLETED))["jobs"][0]["id"]
    with pytest.raises(JobNotCancellable, match="already completed"):
        await tracker.cancel(done)


async def test_cancelling_a_running_job_closes_its_stream_and_frees_the_slot(
    new_tracker, registry, settings
) -> None:
    dispatcher = FakeReplicas(hold=asyncio.Event())
    tracker = new_tracker(dispatcher)
    running = await tracker.submit(submission(registry, settings, steps=4))
    await settle()
    nxt = await tracker.submit(submission(registry, settings))
    assert (await record(tracker, running["id"]))["progress"] == 25
    await tracker.cancel(running["id"])
    await settle()
    cancelled = await record(tracker, running["id"])
    assert (cancelled["status"], cancelled["progress"]) == ("cancelled", 25)
    assert running["id"] in dispatcher.closed
    assert [t.job_id for _, t in dispatcher.calls] == [running["id"], nxt["id"]]


async def test_a_full_queue_refuses_with_a_retry_hint(new_tracker, registry, settings) -> None:
    settings = settings.model_copy(update={"max_queue_size": 2})
    tracker = new_tracker(FakeReplicas(hold=asyncio.Event()), settings=settings)
    for _ in range(3):  # one goes straight to the replica, two wait
        await tracker.submit(submission(registry, settings))
    with pytest.raises(QueueFull) as exc:
        await tracker.submit(submission(registry, settings))
    assert "MAX_QUEUE_SIZE" in exc.value.message and exc.value.retry_after_s >= 1


async def test_submit_many_answers_each_submission_and_a_refusal_spares_the_others(
    new_tracker, registry, settings,
) -> None:
    settings = settings.model_copy(update={"max_queue_size": 2})
    tracker = new_tracker(FakeReplicas(hold=asyncio.Event()), settings=settings)
    running = await tracker.submit(submission(registry, settings, seed=9))
    assert running["queuePosition"] == 0  # straight to the replica
    # Two of four wait; the queue is full for the others, which the first two do not feel.
    subs = [submission(registry, settings, seed=s) for s in range(4)]
    outcomes = await tracker.submit_many(subs)
    accepted = [o for o in outcomes if isinstance(o, dict)]
    assert [type(o) for o in outcomes[2:]] == [QueueFull, QueueFull]
    assert [(await record(tracker, o["id"]))["request"]["seed"] for o in accepted] == [0, 1]
    assert [o["queuePosition"] for o in accepted] == [1, 2]


async def test_a_lost_replica_requeues_the_job_which_then_completes(
        new_tracker, registry, settings) -> None:
    dispatcher = FakeReplicas(lose=1)
    tracker = new_tracker(dispatcher)
    job = await tracker.submit(submission(registry, settings))
    await settle()
    done = await record(tracker, job["id"])
    assert done["status"] == "completed" and done["attempts"] == 2
    assert len(dispatcher.calls) == 2


async def test_a_job_that_keeps_losing_replicas_fails_after_max_attempts(
    new_tracker, registry, settings
) -> None:
    tracker = new_tracker(FakeReplicas(lose=99))
    job = await tracker.submit(submission(registry, settings))
    await settle()
    failed = await record(tracker, job["id"])
    assert failed["status"] == "failed"
    assert "after 3 attempt(s)" in failed["error"]


async def test_a_pipeline_error_fails_only_that_job(new_tracker, registry, settings) -> None:
    dispatcher = FakeReplicas(explode="CUDA out of memory")
    tracker = new_tracker(dispatcher)
    bad = await tracker.submit(submission(registry, settings))
    await settle()
    dispatcher.explode = None
    good = await tracker.submit(submission(registry, settings))
    await settle()
    error = (await record(tracker, bad["id"]))["error"]
    # The client learns what failed, not the replica's internals (those go to the log).
    assert error.startswith("Generation failed: the model replica raised RuntimeError")
    assert "CUDA out of memory" not in error
    assert (await record(tracker, good["id"]))["status"] == "completed"
    status = tracker.counts()
    assert (status["failedJobs"], status["completedJobs"], status["queuedJobs"]) == (1, 1, 0)


@VIRTUAL_TIME
async def test_a_job_past_the_timeout_fails_and_frees_its_replica(
        new_tracker, registry, settings) -> None:
    settings = settings.model_copy(update={"job_timeout_ms": 1000})
    dispatcher = FakeReplicas(hold=asyncio.Event())
    tracker = new_tracker(dispatcher, settings=settings)
    job = await tracker.submit(submission(registry, settings))
    await asyncio.sleep(0.99)  # virtual time: exactly either side of the deadline
    assert (await record(tracker, job["id"]))["status"] == "processing"
    assert dispatcher.closed == []
    await asyncio.sleep(0.02)
    failed = await record(tracker, job["id"])
    assert failed["status"] == "failed" and "timed out" in failed["error"]
    assert job["id"] in dispatcher.closed


async def test_an_idempotency_key_returns_the_same_job(new_tracker, registry, settings) -> None:
    tracker = new_tracker(FakeReplicas())
    first = await tracker.submit(submission(registry, settings, key="abc"))
    again = await tracker.submit(submission(registry, settings, key="abc"))
    other = await tracker.submit(submission(registry, settings, key="xyz"))
    assert again["id"] == first["id"] and other["id"] != first["id"]


async def test_a_restart_requeues_unfinished_jobs_and_runs_them(
        new_tracker, registry, settings) -> None:
    store = memory_store()
    clock = FakeClock()
    hold = asyncio.Event()
    before = new_tracker(FakeReplicas(hold=hold), store=store, clock=clock)
    running = await before.submit(submission(registry, settings))
    await settle()
    waiting = await before.submit(submission(registry, settings))
    assert (await record(before, running["id"]))["status"] == "processing"
    # the process dies here: nothing is closed, the store is all that remains
    after = new_tracker(FakeReplicas(), store=store, clock=clock)
    assert await after.start() == 2
    await settle()
    for job in (running, waiting):
        assert (await record(after, job["id"]))["status"] == "completed"
    assert (await record(after, running["id"]))["attempts"] == 2
    assert after.counts()["completedJobs"] == 2


async def test_list_filters_and_pages(new_tracker, registry, settings) -> None:
    clock = FakeClock()
    dispatcher = FakeReplicas()
    tracker = new_tracker(dispatcher, clock=clock)
    ids = []
    for i in range(5):
        clock.advance(1)
        dispatcher.explode = "boom" if i == 2 else None
        ids.append((await tracker.submit(submission(registry, settings)))["id"])
        await settle()
    page = await tracker.list_jobs(limit=2)
    assert [j["id"] for j in page["jobs"]] == [ids[4], ids[3]]
    rest = await tracker.list_jobs(limit=10, cursor=page["nextCursor"])
    assert [j["id"] for j in rest["jobs"]] == [ids[2], ids[1], ids[0]]
    assert rest["nextCursor"] is None
    failed = await tracker.list_jobs(status=JobStatus.FAILED)
    assert [j["id"] for j in failed["jobs"]] == [ids[2]]
    assert all("result" not in j and "request" not in j for j in page["jobs"])


async def test_unknown_jobs_are_not_found(new_tracker, registry, settings) -> None:
    tracker = new_tracker(FakeReplicas())
    for call in (tracker.get("job_1_x"), tracker.cancel("job_1_x"),
                 tracker.image("job_1_x", 0)):
        with pytest.raises(JobNotFound):
            await call


async def test_models_report_live_replicas(new_tracker, registry, settings) -> None:
    tracker = new_tracker(FakeReplicas(replicas={"tiny-sd": 1}))
    models = {m["id"]: m for m in (await tracker.models())["models"]}
    assert models["tiny-sd"]["loaded"] is True and models["tiny-sd"]["replicas"] == 1
    assert models["tiny-sd-inpaint"]["loaded"] is False
    assert models["sdxl"]["served"] is False and models["sdxl"]["loaded"] is False


async def test_a_job_for_a_model_with_no_replica_says_it_waits_for_loading(
    new_tracker, registry, settings
) -> None:
    dispatcher = FakeReplicas(hold=asyncio.Event())
    tracker = new_tracker(dispatcher)
    dispatcher.hold = None
    # The fake starts jobs at once; stop it from doing so to observe the wait.
    started = asyncio.Event()

    async def never_started(model_id, task):  # type: ignore[no-untyped-def]
        await started.wait()
        yield  # pragma: no cover

    dispatcher.run = never_started  # type: ignore[method-assign]
    cold = await tracker.submit(submission(registry, settings))
    await settle()
    assert (await record(tracker, cold["id"]))["phase"] == "loading_model"
    dispatcher.replicas = {"tiny-sd": 1}
    await tracker.refresh_replicas()
    assert (await record(tracker, cold["id"]))["phase"] == "waiting_for_replica"


async def test_inpainting_runs_on_the_registry_inpainting_model(registry, settings) -> None:
    import base64 as b64
    import io

    from PIL import Image

    def uri(color: str) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buf, "PNG")
        return "data:image/png;base64," + b64.b64encode(buf.getvalue()).decode()

    sub = build_submission(JobType.INPAINT, {"prompt": "x", "image": uri("red"),
                                             "mask": uri("white")},
                           settings=settings, registry=registry, served=SERVED)
    assert sub.model == "tiny-sd-inpaint" and sub.request["model"] == "tiny-sd"
    legacy = build_submission(JobType.INPAINT, {"prompt": "x", "image": uri("red"),
                                                "mask": uri("white")},
                              settings=settings, registry=registry,
                              served=frozenset({"tiny-sd"}))
    assert legacy.model == "tiny-sd"


async def test_compatible_waiting_jobs_share_one_replica_call(
        new_tracker, registry, settings) -> None:
    registry = batching_registry(registry, 4)
    dispatcher = FakeReplicas(hold=asyncio.Event())
    tracker = new_tracker(dispatcher, registry=registry)
    first = await tracker.submit(submission(registry, settings))
    await settle()
    same = [await tracker.submit(submission(registry, settings, prompt=f"p{i}", seed=i))
            for i in range(5)]
    other = await tracker.submit(submission(registry, settings, width=128))
    dispatcher.hold.set()
    for _ in range(5):
        await settle()
    assert dispatcher.batches == [
        [first["id"]],
        [j["id"] for j in same[:4]],
        [same[4]["id"]],  # the bigger job cannot join it
        [other["id"]],
    ]
    for job in [first, *same, other]:
        done = await record(tracker, job["id"])
        assert done["status"] == "completed"
        assert done["result"]["seed"] == job["request"]["seed"]
    assert tracker.counts()["completedJobs"] == 7


@VIRTUAL_TIME
async def test_a_job_at_a_free_replica_waits_briefly_for_jobs_to_share_its_call(
    new_tracker, registry, settings,
) -> None:
    registry = batching_registry(registry, 4)  # max_batch_wait_s: 0.05 by default
    dispatcher = FakeReplicas(elapsed_ms=2000)
    tracker = new_tracker(dispatcher, registry=registry)
    warm = await tracker.submit(submission(registry, settings))
    await settle()  # done: a job like these takes 2 s, so the next may wait 50 ms
    first = await tracker.submit(submission(registry, settings, seed=1))
    await settle()
    assert dispatcher.batches == [[warm["id"]]]  # a replica is free, yet it waits
    second = await tracker.submit(submission(registry, settings, seed=2))
    await asyncio.sleep(0.08)
    await settle()
    assert dispatcher.batches[1:] == [[first["id"], second["id"]]]
    assert (await record(tracker, second["id"]))["status"] == "completed"


async def test_a_full_batch_or_a_job_of_unknown_cost_goes_without_waiting(
    new_tracker, registry, settings,
) -> None:
    registry = batching_registry(registry, 3)
    dispatcher = FakeReplicas(elapsed_ms=2000)
    tracker = new_tracker(dispatcher, registry=registry)
    unknown = await tracker.submit(submission(registry, settings))  # nothing finished yet
    await settle()
    assert dispatcher.batches == [[unknown["id"]]]
    full = [await tracker.submit(submission(registry, settings, seed=s)) for s in range(3)]
    await settle()
    assert dispatcher.batches[1:] == [[j["id"] for j in full]]  # no wait: nothing to add


@VIRTUAL_TIME
async def test_no_wait_for_a_job_that_already_queued_or_when_other_replicas_are_free(
    new_tracker, registry, settings,
) -> None:
    clock = FakeClock()
    registry = batching_registry(registry, 4)
    dispatcher = FakeReplicas(elapsed_ms=2000, hold=asyncio.Event())
    tracker = new_tracker(dispatcher, clock=clock, registry=registry)
    dispatcher.hold.set()
    await tracker.submit(submission(registry, settings))
    await settle()  # a lone job took 2 s: the next may wait 50 ms from its submission
    dispatcher.hold.clear()
    busy = await tracker.submit(submission(registry, settings, width=128))  # occupies the replica
    await asyncio.sleep(0.08)  # after its own wait
    queued = await tracker.submit(submission(registry, settings, seed=1))
    clock.advance(60)  # it queued 60 ms behind `busy`
    dispatcher.hold.set()
    await settle()
    assert dispatcher.batches[1:] == [[busy["id"]], [queued["id"]]]  # sent without a wait

    two = batching_registry(registry, 4, max_replicas=2)
    dispatcher = FakeReplicas(elapsed_ms=2000)
    tracker = new_tracker(dispatcher, clock=clock, registry=two)
    await tracker.submit(submission(two, settings))
    await settle()
    lone = await tracker.submit(submission(two, settings, seed=2))
    await settle()
    assert dispatcher.batches[1:] == [[lone["id"]]]  # two replicas free: no reason to wait


async def test_cancelling_one_job_of_a_batch_keeps_the_others(
        new_tracker, registry, settings) -> None:
    registry = batching_registry(registry, 4)
    dispatcher = FakeReplicas(hold=asyncio.Event())
    tracker = new_tracker(dispatcher, registry=registry)
    blocker = await tracker.submit(submission(registry, settings))
    await settle()
    jobs = [await tracker.submit(submission(registry, settings, seed=i)) for i in range(3)]
    await tracker.cancel(blocker["id"])  # the whole first call goes: its only job is cancelled
    await settle()
    assert dispatcher.batches[1] == [j["id"] for j in jobs]
    await tracker.cancel(jobs[1]["id"])
    dispatcher.hold.set()
    await settle()
    statuses = [(await record(tracker, j["id"]))["status"] for j in jobs]
    assert statuses == ["completed", "cancelled", "completed"]
    assert blocker["id"] in dispatcher.closed


async def test_the_cache_of_finished_records_stays_within_its_byte_budget(
    new_tracker, registry, settings, monkeypatch
) -> None:
    from serve_app.jobs import book as book_module

    monkeypatch.setattr(book_module, "RECENT_BYTES", 3000)
    tracker = new_tracker(FakeReplicas())
    ids = []
    for i in range(10):
        ids.append((await tracker.submit(submission(registry, settings, seed=i)))["id"])
        await settle()
    book = tracker._book
    assert book._recent.size == sum(len(v) for v in book._recent.records()) <= 3000
    assert 0 < len(book._recent) < 10
    # evicted records are still served, from the store
    assert [(await record(tracker, i))["status"] for i in ids] == ["completed"] * len(ids)


async def test_a_running_job_shows_its_latest_preview_which_is_never_stored(
    new_tracker, registry, settings
) -> None:
    hold = asyncio.Event()
    store = memory_store()
    tracker = new_tracker(FakeReplicas(hold=hold), store=store)
    job = await tracker.submit(submission(registry, settings, steps=4, preview=True,
                                          previewEvery=1))
    assert job["request"]["preview"] is True and job["request"]["previewEvery"] == 1
    await settle()  # parked after step 1
    running = await record(tracker, job["id"])
    assert running["preview"]["step"] == 1
    uri = running["preview"]["image"]
    assert uri.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == f"thumbnail of {job['id']} at 1".encode()
    saved = store.store.load(job["id"])  # progress (and its preview) is memory-only
    assert saved is None or "preview" not in json.loads(saved)
    hold.set()
    await settle()
    done = await record(tracker, job["id"])
    assert done["status"] == "completed" and "preview" not in done


async def test_a_job_without_preview_has_none(new_tracker, registry, settings) -> None:
    hold = asyncio.Event()
    tracker = new_tracker(FakeReplicas(hold=hold))
    job = await tracker.submit(submission(registry, settings, steps=4))
    await settle()
    running = await record(tracker, job["id"])
    assert running["status"] == "processing" and "preview" not in running
    assert "preview" not in running["request"] and "previewEvery" not in running["request"]
