"""JobBook: counts, processing time and polled records follow every change, and survive a
reload from the store."""

from __future__ import annotations

import json

import pytest

from serve_app import records
from serve_app.errors import JobNotFound
from serve_app.jobs import Job, JobResult, JobStatus
from serve_app.records import JobBook
from serve_app.schemas import JobType, Priority
from serve_app.store import MemoryStore


def job(job_id: str, created_at_ms: int = 0) -> Job:
    return Job(id=job_id, type=JobType.TEXT2IMG, model="m", request={"prompt": job_id},
               created_at_ms=created_at_ms, priority=Priority("normal"))


def result(ms: int) -> JobResult:
    return JobResult(images=["data:image/png;base64,AAAA"], seeds=[1], parameters={},
                     time_taken_ms=ms, content_type="image/png")


def counts(book: JobBook) -> list[int]:
    return [book.count(s) for s in JobStatus]


def test_counts_and_average_follow_each_change_and_match_the_store() -> None:
    book = JobBook(MemoryStore())
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        book.add(j)
    book.transition(a, lambda j: j.start(10))
    book.transition(b, lambda j: j.start(10))
    book.finish(a, lambda j: j.complete(result(300), 20))
    book.finish(b, lambda j: j.complete(result(100), 30))
    book.finish(c, lambda j: j.cancel(40))
    assert counts(book) == [book.store.counts()[s] for s in JobStatus]
    assert (book.count(JobStatus.COMPLETED), book.count(JobStatus.CANCELLED)) == (2, 1)
    assert book.count(JobStatus.QUEUED) == book.count(JobStatus.PROCESSING) == 0
    assert book.average_ms == 200
    assert book.live == {}

    again = JobBook(book.store)  # a restarted tracker
    assert again.average_ms is None
    again.load_totals()
    assert (counts(again), again.average_ms) == (counts(book), 200)


def test_a_finished_job_whose_call_is_out_stays_live_until_dropped() -> None:
    book = JobBook(MemoryStore())
    a = job("a")
    book.add(a)
    book.finish(a, lambda j: j.cancel(5), keep_live=True)
    assert book.live == {"a": a}
    assert json.loads(book.rendered("a"))["status"] == "cancelled"


def test_finished_records_are_served_within_the_byte_budget_then_from_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(records, "RECENT_BYTES", 1500)
    book = JobBook(MemoryStore())
    jobs = [job(f"job-{i}") for i in range(8)]
    for j in jobs:
        book.add(j)
        book.finish(j, lambda x: x.cancel(1))
    assert book._recent_bytes == sum(map(len, book._recent.values())) <= 1500
    assert 0 < len(book._recent) < 8
    assert [json.loads(book.rendered(j.id))["id"] for j in jobs] == [j.id for j in jobs]
    with pytest.raises(JobNotFound):
        book.rendered("nope")


def test_prune_drops_old_records_and_recounts() -> None:
    book = JobBook(MemoryStore())
    old, new = job("old"), job("new", created_at_ms=1000)
    for j, at in ((old, 10), (new, 2000)):
        book.add(j)
        book.finish(j, lambda x, t=at: x.cancel(t))
    assert book.prune(finished_before_ms=1000, keep_last=100) == 1
    assert book.count(JobStatus.CANCELLED) == 1
    assert book.find("old") is None and book.find("new") is not None
    with pytest.raises(JobNotFound):
        book.rendered("old")  # not answered from the cache either


def test_a_requeued_job_counts_as_queued_again() -> None:
    book = JobBook(MemoryStore())
    a = job("a")
    book.add(a)
    book.transition(a, lambda j: j.start(10))
    assert (book.count(JobStatus.QUEUED), book.count(JobStatus.PROCESSING)) == (0, 1)
    book.transition(a, lambda j: j.requeue("its replica died"))
    assert (book.count(JobStatus.QUEUED), book.count(JobStatus.PROCESSING)) == (1, 0)
    assert book.store.counts()[JobStatus.QUEUED] == 1
    with pytest.raises(AssertionError):
        book.transition(a, lambda j: j.cancel(20))  # ending a job goes through finish()
