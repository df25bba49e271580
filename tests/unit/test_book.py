"""JobBook: counts, processing time and polled records follow every change, changes reach
the store behind the tracker's back, and totals survive a reload from the store."""

from __future__ import annotations

import json

import pytest

from serve_app.errors import JobNotFound
from serve_app.jobs import book as book_module
from serve_app.jobs.book import JobBook
from serve_app.jobs.codec import loads
from serve_app.jobs.job import Job, JobResult, JobStatus
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.messages import JobType, Priority
from serve_app.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def job(job_id: str, created_at_ms: int = 0) -> Job:
    return Job(id=job_id, type=JobType.TEXT2IMG, model="m", request={"prompt": job_id},
               created_at_ms=created_at_ms, priority=Priority("normal"))


def result(ms: int) -> JobResult:
    return JobResult(images=["data:image/png;base64,AAAA"], seeds=[1], parameters={},
                     time_taken_ms=ms, content_type="image/png")


def counts(book: JobBook) -> list[int]:
    return [book.count(s) for s in JobStatus]


def new_book() -> tuple[JobBook, MemoryStore]:
    store = MemoryStore()
    return JobBook(InlineStoreCalls(store)), store


async def test_counts_and_average_follow_each_change_and_match_the_store() -> None:
    book, store = new_book()
    a, b, c = job("a"), job("b"), job("c")
    await book.add([a, b, c], now_ms=0)
    book.apply(a, lambda j: j.start(10))
    book.apply(b, lambda j: j.start(10))
    book.apply(a, lambda j: j.complete(result(300), 20))
    book.apply(b, lambda j: j.complete(result(100), 30))
    book.apply(c, lambda j: j.cancel(40))
    await book.writes.flush()
    (totals,) = store.totals().values()
    assert counts(book) == [totals.counts[s] for s in JobStatus]
    assert (book.count(JobStatus.COMPLETED), book.count(JobStatus.CANCELLED)) == (2, 1)
    assert book.count(JobStatus.QUEUED) == book.count(JobStatus.PROCESSING) == 0
    assert book.average_ms() == 200

    again = JobBook(InlineStoreCalls(store))  # a restarted tracker
    assert again.average_ms() is None
    await again.load_totals()
    assert (counts(again), again.average_ms()) == (counts(book), 200)


async def test_counts_per_owner() -> None:
    book, _ = new_book()
    a, b = job("a"), job("b")
    a.owner, b.owner = "ana", "bo"
    await book.add([a, b], now_ms=0)
    book.apply(a, lambda j: j.start(1))
    book.apply(a, lambda j: j.complete(result(50), 2))
    assert book.count(JobStatus.COMPLETED, "ana", everyone=False) == 1
    assert book.count(JobStatus.COMPLETED, "bo", everyone=False) == 0
    assert book.count(JobStatus.QUEUED, "bo", everyone=False) == 1
    assert book.count(JobStatus.QUEUED) == 1 and book.count(JobStatus.COMPLETED) == 1
    assert book.average_ms("bo", everyone=False) is None and book.average_ms() == 50


async def test_a_change_not_yet_saved_is_what_reads_see() -> None:
    book, store = new_book()
    a = job("a")
    await book.add([a], now_ms=0)
    book.apply(a, lambda j: j.cancel(5))
    assert loads(store.load("a") or "").status is JobStatus.QUEUED  # not saved yet
    found = await book.find("a")
    assert found is not None and found.status is JobStatus.CANCELLED
    await book.writes.flush()
    assert loads(store.load("a") or "").status is JobStatus.CANCELLED


async def test_watchers_hear_every_change_progress_included() -> None:
    book, _ = new_book()
    seen: list[tuple[str, int]] = []
    book.watch(lambda j, before: seen.append(
        (before and before.value, j.status.value, j.progress)))
    a = job("a")
    await book.add([a], now_ms=0)
    book.apply(a, lambda j: j.start(1))
    a.report_progress(1, 2)
    book.notify(a, a.status)
    book.apply(a, lambda j: j.complete(result(5), 6))
    assert seen == [(None, "queued", 0), ("queued", "processing", 0),
                    ("processing", "processing", 50), ("processing", "completed", 100)]


async def test_finished_records_are_served_within_the_byte_budget_then_from_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(book_module, "RECENT_BYTES", 1500)
    book, _ = new_book()
    jobs = [job(f"job-{i}") for i in range(8)]
    await book.add(jobs, now_ms=0)
    for j in jobs:
        book.apply(j, lambda x: x.cancel(1))
    await book.writes.flush()
    assert book._recent.size == sum(len(r) for r in book._recent.records()) <= 1500
    assert 0 < len(book._recent) < 8
    rendered = [json.loads((await book.rendered(j.id))[1])["id"] for j in jobs]
    assert rendered == [j.id for j in jobs]
    with pytest.raises(JobNotFound):
        await book.rendered("nope")


async def test_prune_drops_old_records_and_recounts() -> None:
    book, _ = new_book()
    old, new = job("old"), job("new", created_at_ms=1000)
    await book.add([old, new], now_ms=0)
    book.apply(old, lambda x: x.cancel(10))
    book.apply(new, lambda x: x.cancel(2000))
    await book.writes.flush()
    assert await book.prune(finished_before_ms=1000, keep_last=100) == ["old"]
    assert book.count(JobStatus.CANCELLED) == 1
    assert await book.find("old") is None and await book.find("new") is not None
    with pytest.raises(JobNotFound):
        await book.rendered("old")  # not answered from the cache either


async def test_a_requeued_job_counts_as_queued_again() -> None:
    book, store = new_book()
    a = job("a")
    await book.add([a], now_ms=0)
    book.apply(a, lambda j: j.start(10))
    assert (book.count(JobStatus.QUEUED), book.count(JobStatus.PROCESSING)) == (0, 1)
    book.apply(a, lambda j: j.requeue("its replica died"))
    assert (book.count(JobStatus.QUEUED), book.count(JobStatus.PROCESSING)) == (1, 0)
    await book.writes.flush()
    assert store.totals()[""].counts["queued"] == 1


async def test_only_the_save_of_new_jobs_asks_the_store_for_durability() -> None:
    saves: list[tuple[list[str], bool]] = []

    class Recording(MemoryStore):
        def save_many(self, rows, *, durable=False):  # type: ignore[no-untyped-def]
            saves.append(([r.id for r in rows], durable))
            super().save_many(rows, durable=durable)

    book = JobBook(InlineStoreCalls(Recording()))
    a = job("a")
    await book.add([a, job("b")], now_ms=0)
    book.apply(a, lambda j: j.start(10))
    book.apply(a, lambda j: j.complete(result(300), 20))
    await book.writes.flush()
    assert saves[0] == (["a", "b"], True)  # acknowledged only once it is on disk
    assert saves[1:] and all(not durable for _, durable in saves[1:])
