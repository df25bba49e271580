"""The JobStore contract, run against every store: memory, SQLite and a real Redis.

Jobs go in and come out through the jobs codec (`Jobs` below), as the tracker uses a store.

The Redis case needs a server at IMAGEGEN_TEST_REDIS_URL (default redis://127.0.0.1:6379/15);
its database is flushed before each test. Without a server the case is skipped, except
under CI (the CI environment variable set), where it fails: CI starts one.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from serve_app.jobs.codec import loads, to_row
from serve_app.jobs.job import Job, JobResult, JobStatus
from serve_app.jobs.webhook_state import Delivery, WebhookState
from serve_app.messages import (
    GenerationTask,
    InputImage,
    JobType,
    OutputFormat,
    Priority,
    WebhookEvent,
)
from serve_app.stores import redis as redis_module
from serve_app.stores.contract import JobFilter, JobStore, Page
from serve_app.stores.memory import MemoryStore
from serve_app.stores.sqlite import SchemaTooNew, SQLiteStore
from tests.support.stores import redis_store


class Jobs:
    """A store seen through the jobs codec, as the tracker uses it."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def save(self, job: Job) -> None:
        self.store.save_many([to_row(job)])

    def load(self, job_id: str) -> Job | None:
        text = self.store.load(job_id)
        return loads(text) if text is not None else None

    def unfinished(self) -> list[Job]:
        return [loads(text) for text in self.store.unfinished()]

    def find_idempotent(self, key: str) -> str | None:
        return self.store.find_idempotent(key)

    def query(self, flt: JobFilter, limit: int, cursor: str | None) -> Page:
        return self.store.query(flt, limit, cursor)

    def counts(self) -> dict[str, int]:
        """Jobs per status, whoever owns them."""
        out = dict.fromkeys(JobStatus, 0)
        for totals in self.store.totals().values():
            for status, n in totals.counts.items():
                out[JobStatus(status)] += n
        return out

    def processing_time(self) -> tuple[int, int]:
        """(completed jobs, their summed processing time), whoever owns them."""
        totals = self.store.totals().values()
        return sum(t.completed for t in totals), sum(t.completed_ms for t in totals)

    def prune(self, finished_before_ms: int, keep_last: int) -> int:
        return self.store.prune(finished_before_ms, keep_last)

    def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Jobs]:
    if request.param == "memory":
        s: JobStore = MemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "db" / "jobs.sqlite3")
    else:
        # Small scan chunks, so listings with combined filters cross chunk boundaries.
        monkeypatch.setattr(redis_module, "_SCAN_CHUNK", 16)
        s = redis_store()
    yield Jobs(s)
    s.close()


# -- building jobs -------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def make_task(job_id: str) -> GenerationTask:
    return GenerationTask(
        job_id=job_id,
        mode=JobType.INPAINT,
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        width=512,
        height=512,
        steps=20,
        guidance_scale=7.5,
        seed=1234,
        sampler="euler_a",
        num_images=2,
        strength=0.8,
        output_format=OutputFormat.WEBP,
        quality=80,
        init_image=InputImage(PNG, 512, 512),
        mask_image=InputImage(PNG[::-1], 512, 512),
    )


def make_result(time_taken_ms: int = 1500) -> JobResult:
    return JobResult(
        images=["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"],
        seeds=[1234, 1235],
        parameters={"steps": 20, "sampler": "euler_a"},
        time_taken_ms=time_taken_ms,
        content_type="image/png",
        nsfw_detected=[False, False],
    )


def make_job(
    job_id: str,
    created_at_ms: int,
    *,
    type: JobType = JobType.TEXT2IMG,
    model: str = "sd-1.5",
    key: str | None = None,
) -> Job:
    return Job(
        id=job_id,
        type=type,
        model=model,
        request={"prompt": "a lighthouse at dusk", "steps": 20},
        created_at_ms=created_at_ms,
        priority=Priority.HIGH,
        task=make_task(job_id),
        idempotency_key=key,
    )


def advance(job: Job, status: JobStatus, time_taken_ms: int = 1500) -> Job:
    """Drive `job` from queued to `status` through its transition methods."""
    now = job.created_at_ms + 10
    if status is JobStatus.CANCELLED:
        job.cancel(now)
        return job
    if status is not JobStatus.QUEUED:
        job.start(now, replica="replica-1")
        job.report_progress(5, 20)
    if status is JobStatus.COMPLETED:
        job.complete(make_result(time_taken_ms), now + time_taken_ms)
    elif status is JobStatus.FAILED:
        job.fail("out of memory", now + 5)
    return job


def ids(jobs: list[Job] | list[dict[str, Any]]) -> list[str]:
    return [j["id"] if isinstance(j, dict) else j.id for j in jobs]


def walk(store: Jobs, flt: JobFilter, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = store.query(flt, limit, cursor)
        pages.append(ids(page.jobs))
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def newest_first(jobs: list[Job]) -> list[str]:
    return ids(sorted(jobs, key=lambda j: (j.created_at_ms, j.id), reverse=True))


# -- records -------------------------------------------------------------------------------


def test_save_and_load_round_trip_a_job_with_its_task_and_images(store: Jobs) -> None:
    job = advance(make_job("job_1", 1_000, key="idem-1"), JobStatus.PROCESSING)
    store.save(job)
    loaded = store.load("job_1")
    assert loaded == job
    assert loaded is not None and loaded is not job
    assert loaded.task is not None and loaded.task.init_image is not None
    assert loaded.task.init_image.png == PNG


def test_load_of_an_unknown_id_is_none(store: Jobs) -> None:
    assert store.load("job_missing") is None


def test_completed_job_keeps_its_result_and_drops_its_task(store: Jobs) -> None:
    job = advance(make_job("job_1", 1_000), JobStatus.COMPLETED)
    store.save(job)
    loaded = store.load("job_1")
    assert loaded == replace(job, task=None)
    assert loaded is not None and loaded.result == make_result()


def test_overwrite_moves_the_job_between_status_indexes(store: Jobs) -> None:
    job = make_job("job_1", 1_000)
    for status in (JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.COMPLETED):
        if status is JobStatus.PROCESSING:
            job.start(1_010)
        elif status is JobStatus.COMPLETED:
            job.complete(make_result(), 2_000)
        store.save(job)
    for status in JobStatus:
        listed = ids(store.query(JobFilter(status=status), 10, None).jobs)
        assert listed == (["job_1"] if status is JobStatus.COMPLETED else [])
    assert ids(store.query(JobFilter(), 10, None).jobs) == ["job_1"]
    assert store.unfinished() == []
    assert store.counts()[JobStatus.COMPLETED] == 1
    assert sum(store.counts().values()) == 1


def test_unfinished_lists_queued_and_processing_jobs_oldest_first(store: Jobs) -> None:
    statuses = [JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.QUEUED, JobStatus.FAILED]
    for i, status in enumerate(statuses * 2):
        store.save(advance(make_job(f"job_{i}", 5_000 - i * 100), status))
    assert ids(store.unfinished()) == ["job_6", "job_4", "job_2", "job_0"]


def test_find_idempotent_returns_the_first_job_saved_with_the_key(store: Jobs) -> None:
    store.save(make_job("job_1", 1_000, key="idem-1"))
    store.save(make_job("job_2", 1_001, key="idem-2"))
    store.save(make_job("job_3", 1_002, key="idem-1"))
    store.save(advance(make_job("job_1", 1_000, key="idem-1"), JobStatus.PROCESSING))
    assert store.find_idempotent("idem-1") == "job_1"
    assert store.find_idempotent("idem-2") == "job_2"
    assert store.find_idempotent("idem-unknown") is None


def test_a_job_saved_again_without_its_key_releases_it_for_the_next(store: Jobs) -> None:
    """A submit refused with a 503 whose save may have landed is saved again failed and
    without its Idempotency-Key: the client's retry with that key makes a new job."""
    refused = make_job("job_1", 1_000, key="idem-1")
    store.save(refused)
    refused.idempotency_key = None
    store.save(advance(refused, JobStatus.FAILED))
    assert store.find_idempotent("idem-1") is None
    store.save(make_job("job_2", 1_001, key="idem-1"))
    assert store.find_idempotent("idem-1") == "job_2"
    store.save(advance(make_job("job_2", 1_001, key="idem-1"), JobStatus.PROCESSING))
    other = make_job("job_3", 1_002, key="idem-1")  # a later job never takes it over
    store.save(other)
    other.idempotency_key = None
    store.save(other)
    assert store.find_idempotent("idem-1") == "job_2"


# -- listing -------------------------------------------------------------------------------


def mixed_jobs(n: int) -> list[Job]:
    """`n` jobs over every status, type and a few models, many sharing a creation time."""
    rng = random.Random(7)
    models = ["sd-1.5", "sdxl", "sd-2.1"]
    jobs = []
    for i in range(n):
        job = make_job(
            f"job_{rng.randrange(10**9):09d}",
            1_000 + i // 4,
            type=rng.choice(list(JobType)),
            model=rng.choice(models),
        )
        jobs.append(advance(job, rng.choice(list(JobStatus)), time_taken_ms=100 + i))
    return jobs


def test_query_lists_newest_first(store: Jobs) -> None:
    jobs = mixed_jobs(12)
    for job in jobs:
        store.save(job)
    page = store.query(JobFilter(), 50, None)
    assert ids(page.jobs) == newest_first(jobs)
    assert page.next_cursor is None


FILTERS = [
    JobFilter(status=JobStatus.COMPLETED),
    JobFilter(status=JobStatus.QUEUED),
    JobFilter(type=JobType.IMG2IMG),
    JobFilter(model="sdxl"),
    JobFilter(model="no-such-model"),
    JobFilter(status=JobStatus.FAILED, type=JobType.TEXT2IMG),
    JobFilter(status=JobStatus.COMPLETED, model="sd-2.1"),
    JobFilter(type=JobType.INPAINT, model="sd-1.5"),
    JobFilter(status=JobStatus.CANCELLED, type=JobType.STYLE_TRANSFER, model="sdxl"),
]


def matches(job: Job, flt: JobFilter) -> bool:
    return (
        (flt.status is None or job.status is flt.status)
        and (flt.type is None or job.type is flt.type)
        and (flt.model is None or job.model == flt.model)
    )


def test_query_filters_by_status_type_model_and_their_combinations(store: Jobs) -> None:
    jobs = mixed_jobs(60)
    for job in jobs:
        store.save(job)
    for flt in FILTERS:
        expected = newest_first([j for j in jobs if matches(j, flt)])
        assert ids(store.query(flt, 100, None).jobs) == expected, flt


def test_keyset_pagination_walks_every_job_exactly_once(store: Jobs) -> None:
    jobs = mixed_jobs(25)  # creation times repeat four at a time: ids break the ties
    for job in jobs:
        store.save(job)
    pages = walk(store, JobFilter(), 7)
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert [i for p in pages for i in p] == newest_first(jobs)


def test_keyset_pagination_of_combined_filters_over_many_jobs(store: Jobs) -> None:
    jobs = mixed_jobs(600)
    for job in jobs:
        store.save(job)
    for flt in FILTERS:
        flat = [i for p in walk(store, flt, 9) for i in p]
        assert flat == newest_first([j for j in jobs if matches(j, flt)]), flt


def test_pagination_ends_without_a_cursor_when_the_last_page_is_full(store: Jobs) -> None:
    for i in range(6):
        store.save(make_job(f"job_{i}", 1_000 + i))
    first = store.query(JobFilter(), 3, None)
    assert ids(first.jobs) == ["job_5", "job_4", "job_3"]
    second = store.query(JobFilter(), 3, first.next_cursor)
    assert ids(second.jobs) == ["job_2", "job_1", "job_0"]
    assert second.next_cursor is None


@pytest.mark.parametrize("cursor", ["nonsense", "abc:job_1", "", "1000:",
                                    "99999999999999999999:job_1", "-5:job_1", "٣:job_1"])
def test_a_malformed_cursor_raises_value_error(store: Jobs, cursor: str) -> None:
    store.save(make_job("job_1", 1_000))
    with pytest.raises(ValueError):
        store.query(JobFilter(), 10, cursor)


# -- statistics and pruning ----------------------------------------------------------------


def test_counts_cover_every_status(store: Jobs) -> None:
    assert store.counts() == dict.fromkeys(JobStatus, 0)
    plan = {JobStatus.QUEUED: 3, JobStatus.PROCESSING: 2, JobStatus.COMPLETED: 4}
    plan |= {JobStatus.FAILED: 1}
    n = 0
    for status, count in plan.items():
        for _ in range(count):
            store.save(advance(make_job(f"job_{n}", 1_000 + n), status))
            n += 1
    assert store.counts() == {**dict.fromkeys(JobStatus, 0), **plan}


def test_processing_time_sums_completed_jobs_once(store: Jobs) -> None:
    assert store.processing_time() == (0, 0)
    for i, taken in enumerate([1_000, 2_500, 500]):
        job = advance(make_job(f"job_{i}", 1_000 + i), JobStatus.COMPLETED, taken)
        store.save(job)
        store.save(job)  # the same completed job written twice counts once
    store.save(advance(make_job("job_failed", 2_000), JobStatus.FAILED))
    store.save(advance(make_job("job_running", 2_001), JobStatus.PROCESSING))
    assert store.processing_time() == (3, 4_000)


def test_prune_by_age_deletes_old_finished_jobs_and_keeps_unfinished(store: Jobs) -> None:
    old_done = advance(make_job("job_old_done", 1_000, key="idem-old"), JobStatus.COMPLETED)
    old_failed = advance(make_job("job_old_failed", 1_001), JobStatus.FAILED)
    old_queued = make_job("job_old_queued", 1_002)
    old_running = advance(make_job("job_old_running", 1_003), JobStatus.PROCESSING)
    new_done = advance(make_job("job_new_done", 50_000), JobStatus.COMPLETED, 700)
    for job in (old_done, old_failed, old_queued, old_running, new_done):
        store.save(job)
    assert sorted(store.prune(finished_before_ms=10_000, keep_last=100)) == [
        "job_old_done", "job_old_failed"]
    assert store.load("job_old_done") is None
    assert store.load("job_old_failed") is None
    assert store.find_idempotent("idem-old") is None
    assert ids(store.unfinished()) == ["job_old_queued", "job_old_running"]
    assert ids(store.query(JobFilter(), 10, None).jobs) == [
        "job_new_done",
        "job_old_running",
        "job_old_queued",
    ]
    assert store.processing_time() == (1, 700)
    assert store.prune(finished_before_ms=10_000, keep_last=100) == []


def test_prune_keeps_only_the_newest_finished_jobs(store: Jobs) -> None:
    statuses = [JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.QUEUED]
    for i in range(12):
        store.save(advance(make_job(f"job_{i:02d}", 1_000 + i), statuses[i % 4]))
    assert sorted(store.prune(finished_before_ms=0, keep_last=4)) == [
        "job_00", "job_01", "job_02", "job_04", "job_05"]
    remaining = ids(store.query(JobFilter(), 50, None).jobs)
    assert remaining == ["job_11", "job_10", "job_09", "job_08", "job_07", "job_06", "job_03"]
    assert store.counts()[JobStatus.QUEUED] == 3
    assert len(store.prune(finished_before_ms=0, keep_last=0)) == 4
    assert ids(store.query(JobFilter(), 50, None).jobs) == ["job_11", "job_07", "job_03"]
    assert store.processing_time() == (0, 0)


def test_concurrent_saves_from_threads_keep_indexes_and_sums_exact(store: Jobs) -> None:
    jobs = [make_job(f"job_{i:03d}", 1_000 + i) for i in range(40)]
    shared = advance(make_job("job_shared", 500), JobStatus.COMPLETED, 1_000)

    def run(job: Job) -> None:
        store.save(job)
        job.start(job.created_at_ms + 1)
        store.save(job)
        store.save(shared)  # every thread writes the same finished job too
        job.complete(make_result(10), job.created_at_ms + 20)
        store.save(job)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, jobs))
    assert store.counts() == {**dict.fromkeys(JobStatus, 0), JobStatus.COMPLETED: 41}
    assert store.processing_time() == (41, 40 * 10 + 1_000)
    assert store.unfinished() == []
    assert len(store.query(JobFilter(status=JobStatus.COMPLETED), 100, None).jobs) == 41


def test_webhooks_pending_lists_jobs_until_their_deliveries_are_settled(store: Jobs) -> None:
    def with_hook(job: Job, settled: bool) -> Job:
        job.webhook = WebhookState("https://hooks.example.com/h", [WebhookEvent.COMPLETED],
                                   "http://gen.test")
        sent = Delivery(WebhookEvent.COMPLETED, f"msg_{job.id}", "{}", created_at_ms=1)
        if settled:
            sent.delivered(2)
        job.webhook.put(sent)
        return job

    waiting = with_hook(advance(make_job("job_1", 1_000), JobStatus.COMPLETED), False)
    store.save(waiting)
    store.save(with_hook(advance(make_job("job_2", 1_001), JobStatus.FAILED), True))
    store.save(advance(make_job("job_3", 1_002), JobStatus.COMPLETED))
    assert [loads(r) for r in store.store.webhooks_pending()] == [waiting]
    assert waiting.webhook is not None
    waiting.webhook.deliveries[0].delivered(3)
    store.save(waiting)
    assert store.store.webhooks_pending() == []
    # A job whose delivery is pending is never pruned: its next attempt needs the record.
    pending = with_hook(advance(make_job("job_4", 1_003), JobStatus.CANCELLED), False)
    store.save(pending)
    assert sorted(store.prune(finished_before_ms=10**12, keep_last=0)) == [
        "job_1", "job_2", "job_3"]
    assert [loads(r) for r in store.store.webhooks_pending()] == [pending]
    assert store.load("job_4") == pending
    assert pending.webhook is not None
    pending.webhook.deliveries[0].give_up(4)  # the delivery ends: now it may go
    store.save(pending)
    assert store.prune(finished_before_ms=10**12, keep_last=0) == ["job_4"]
    assert store.store.webhooks_pending() == []


def test_missing_names_the_jobs_without_a_record(store: Jobs) -> None:
    store.save(make_job("job_a", 1_000))
    store.save(advance(make_job("job_b", 1_001), JobStatus.COMPLETED))
    assert store.store.missing(["job_a", "job_x", "job_b", "job_y"]) == ["job_x", "job_y"]
    assert store.store.missing([]) == []
    many = [f"job_{i}" for i in range(1200)]  # past SQLite's bound on parameters
    assert store.store.missing(many) == many


# -- Redis only ----------------------------------------------------------------------------


def test_a_redis_listing_reads_a_bounded_slice_and_says_where_to_go_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters that match little (here: inpaint jobs of a base model, which never has
    any) read at most the scan budget per request; the page ends early with a cursor, and
    following the cursors finds exactly what matches, in order."""
    monkeypatch.setattr(redis_module, "SCAN_BUDGET", 40)
    monkeypatch.setattr(redis_module, "_SCAN_CHUNK", 16)
    store = Jobs(redis_store())
    for i in range(200):
        kind = JobType.INPAINT if i % 2 else JobType.TEXT2IMG
        store.save(make_job(f"job_{i:03d}", 1_000 + i, type=kind,
                            model="sd-inpaint" if i % 2 else "sd-1.5"))
    store.save(make_job("job_rare", 1_050, type=JobType.INPAINT, model="sd-1.5"))
    none = JobFilter(type="inpaint", model="sd-1.5")
    pages, cursor, found = 0, None, []
    while True:
        page = store.store.query(none, 10, cursor)
        pages += 1
        found += [j["id"] for j in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert found == ["job_rare"] and pages >= 3  # several bounded reads, not one walk
    first = store.store.query(none, 10, None)
    assert first.jobs == [] and first.next_cursor is not None  # short, with a way on
    store.store.close()


# -- SQLite only ---------------------------------------------------------------------------


def test_save_many_writes_all_rows_or_none(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    good = to_row(make_job("job_1", 1_000))
    bad = replace(to_row(make_job("job_2", 1_001)), record=None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.save_many([good, bad])
    assert store.load("job_1") is None  # rolled back with its companion
    store.save_many([good])
    assert store.load("job_1") == good.record
    store.close()


@pytest.mark.parametrize(("fsync", "durable", "synced"), [
    (True, True, True),     # a submit, as shipped: its transaction is synced
    (True, False, False),   # progress and results: WAL-safe, synced at checkpoints
    (False, True, False),   # IMAGEGEN_DURABILITY=relaxed
])
def test_a_durable_save_commits_at_synchronous_full_and_only_it(
        tmp_path: Path, fsync: bool, durable: bool, synced: bool) -> None:
    store = SQLiteStore(tmp_path / "jobs.sqlite3", fsync_durable=fsync)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.save_many([to_row(make_job("job_1", 1_000))], durable=durable)
    store._db.set_trace_callback(None)
    commit = statements.index("COMMIT")
    if synced:
        assert statements[0] == "PRAGMA synchronous=FULL"
        assert statements[commit + 1:] == ["PRAGMA synchronous=NORMAL"]
    else:
        assert not any("synchronous" in s for s in statements)
    # Every other write runs at NORMAL, whatever the last save was.
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    store.close()


def test_totals_are_kept_per_owner(store: Jobs) -> None:
    for i, owner in enumerate(["ana", "bo", "ana", None]):
        job = advance(make_job(f"job_{i}", 1_000 + i), JobStatus.COMPLETED, 100 * (i + 1))
        job.owner = owner
        store.save(job)
    waiting = make_job("job_9", 2_000)
    waiting.owner = "bo"
    store.save(waiting)
    totals = store.store.totals()
    assert (totals["ana"].counts["completed"], totals["ana"].completed,
            totals["ana"].completed_ms) == (2, 2, 400)
    assert (totals["bo"].counts["completed"], totals["bo"].counts["queued"]) == (1, 1)
    assert totals[""].completed_ms == 400
    store.prune(finished_before_ms=10**12, keep_last=0)
    assert store.store.totals().get("ana") is None or store.store.totals()["ana"].completed == 0


def test_listing_by_owner(store: Jobs) -> None:
    for i, owner in enumerate(["ana", "bo", "ana", None]):
        job = make_job(f"job_{i}", 1_000 + i)
        job.owner = owner
        store.save(job)
    assert ids(store.query(JobFilter(owner="ana"), 10, None).jobs) == ["job_2", "job_0"]
    assert ids(store.query(JobFilter(owner="bo", status="queued"), 10, None).jobs) == ["job_1"]


def test_sqlite_store_keeps_jobs_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "jobs.sqlite3"
    first = Jobs(SQLiteStore(path))
    queued = make_job("job_1", 1_000, key="idem-1")
    done = advance(make_job("job_2", 2_000), JobStatus.COMPLETED, 900)
    first.save(queued)
    first.save(done)
    first.close()

    second = Jobs(SQLiteStore(path))
    try:
        assert second.load("job_1") == queued
        assert second.load("job_2") == replace(done, task=None)
        assert ids(second.unfinished()) == ["job_1"]
        assert second.find_idempotent("idem-1") == "job_1"
        assert ids(second.query(JobFilter(), 10, None).jobs) == ["job_2", "job_1"]
        assert second.processing_time() == (1, 900)
    finally:
        second.close()


def test_sqlite_store_refuses_a_database_from_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(SchemaTooNew, match="newer"):
        SQLiteStore(path)


def test_sqlite_store_upgrades_a_version_1_file_with_summaries(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = Jobs(SQLiteStore(path))
    done = advance(make_job("job_1", 1_000), JobStatus.COMPLETED, 500)
    store.save(done)
    store.close()
    db = sqlite3.connect(path)  # what version 1 wrote: no summary or owner column
    db.execute("ALTER TABLE jobs DROP COLUMN summary")
    db.execute("DROP INDEX jobs_owner")
    db.execute("ALTER TABLE jobs DROP COLUMN owner")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    upgraded = Jobs(SQLiteStore(path))
    try:
        assert upgraded.query(JobFilter(), 10, None).jobs == [done.summary()]
        assert upgraded.load("job_1") == replace(done, task=None)
    finally:
        upgraded.close()
