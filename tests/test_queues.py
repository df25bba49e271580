from __future__ import annotations

from serve_app.jobs.job import Job
from serve_app.jobs.queues import JobQueues
from serve_app.messages import JobType, Priority


def job(job_id: str, priority: str = "normal", model: str = "m", key: str = "k") -> Job:
    return Job(id=job_id, type=JobType.TEXT2IMG, model=model, request={"key": key},
               created_at_ms=0, priority=Priority(priority))


def test_higher_priority_first_then_first_in_first_out() -> None:
    q = JobQueues(["m"])
    for j in (job("a", "low"), job("b"), job("c", "high"), job("d"), job("e", "high")):
        q.push(j)
    assert [q.pop("m").id for _ in range(5)] == ["c", "e", "b", "d", "a"]  # type: ignore[union-attr]
    assert q.pop("m") is None and len(q) == 0


def test_removed_jobs_are_skipped_and_not_counted() -> None:
    q = JobQueues(["m"])
    q.push(job("a"))
    q.push(job("b"))
    assert q.remove("a") and not q.remove("a")
    assert len(q) == 1 and "a" not in q
    assert q.pop("m").id == "b"  # type: ignore[union-attr]


def test_positions_follow_the_run_order() -> None:
    q = JobQueues(["m", "n"])
    jobs = [job("a", "low"), job("b"), job("c", "high"), job("x", model="n")]
    assert [q.push(j) for j in jobs] == [1, 1, 1, 1]  # each was last of its priority
    assert [q.position(j) for j in jobs] == [3, 2, 1, 1]
    q.remove("c")
    assert q.position(jobs[1]) == 1 and q.position(jobs[2]) is None


def test_matching_finds_compatible_jobs_in_queue_order_up_to_the_limit() -> None:
    q = JobQueues(["m"])
    for j in (job("a", key="x"), job("b", key="y"), job("c", key="x", priority="high"),
              job("d", key="x")):
        q.push(j)
    found = q.matching("m", "x", lambda j: j.request["key"], limit=2)
    assert [j.id for j in found] == ["c", "a"]
    assert len(q) == 4  # found, not taken
    assert q.matching("m", "x", lambda j: j.request["key"], limit=0) == []


def test_push_reports_the_position_a_new_job_gets() -> None:
    q = JobQueues(["m"])
    assert [q.push(job(i, p)) for i, p in
            (("a", "low"), ("b", "normal"), ("c", "normal"), ("d", "high"))] == [1, 1, 2, 1]
    q.remove("b")
    assert q.push(job("e")) == 3  # d (high), c, then e
    assert q.position(q.pop("m")) is None  # type: ignore[arg-type]
