"""JobQueues: priority first; within a priority API keys take turns (fair queueing);
FIFO within one key."""

from __future__ import annotations

from serve_app.jobs.job import Job
from serve_app.jobs.queues import JobQueues
from serve_app.messages import JobType, Priority


def job(job_id: str, priority: str = "normal", model: str = "m", key: str = "k",
        owner: str | None = None) -> Job:
    return Job(id=job_id, type=JobType.TEXT2IMG, model=model, request={"key": key},
               created_at_ms=0, priority=Priority(priority), owner=owner)


def drain(q: JobQueues, model: str = "m") -> list[str]:
    """Every job in the order the model's replicas would take them."""
    order = []
    while (nxt := q.peek(model)) is not None:
        q.take(nxt.id)
        order.append(nxt.id)
    return order


def test_higher_priority_first_then_first_in_first_out() -> None:
    q = JobQueues(["m"])
    for j in (job("a", "low"), job("b"), job("c", "high"), job("d"), job("e", "high")):
        q.push(j)
    assert drain(q) == ["c", "e", "b", "d", "a"]
    assert q.peek("m") is None and len(q) == 0


def test_removed_jobs_are_skipped_and_not_counted() -> None:
    q = JobQueues(["m"])
    q.push(job("a"))
    q.push(job("b"))
    assert q.remove("a") and not q.remove("a")
    assert len(q) == 1 and "a" not in q
    assert drain(q) == ["b"]


def test_positions_follow_the_run_order() -> None:
    q = JobQueues(["m", "n"])
    jobs = [job("a", "low"), job("b"), job("c", "high"), job("x", model="n")]
    for j in jobs:
        q.push(j)
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


def test_keys_take_turns_so_a_flood_does_not_delay_a_single_job() -> None:
    q = JobQueues(["m"])
    for i in range(100):
        q.push(job(f"flood{i}", owner="flood"))
    taken = [q.peek("m"), q.peek("m")]
    assert taken[0] is not None
    q.take(taken[0].id)  # one of the flood is running
    q.push(job("single", owner="other"))
    assert q.position(q._entries["single"].job) == 1  # next, not 100th
    order = drain(q)
    assert order[0] == "single" and order[1:4] == ["flood1", "flood2", "flood3"]


def test_turns_alternate_between_busy_keys_and_follow_weights() -> None:
    q = JobQueues(["m"], weights={"big": 2.0})
    for i in range(4):
        q.push(job(f"a{i}", owner="a"))
        q.push(job(f"b{i}", owner="b"))
    assert drain(q) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    for i in range(4):
        q.push(job(f"big{i}", owner="big"))
        q.push(job(f"one{i}", owner="one"))
    assert drain(q) == ["big0", "one0", "big1", "one1", "big2", "big3", "one2", "one3"]


def test_an_idle_key_does_not_bank_turns() -> None:
    q = JobQueues(["m"])
    q.push(job("early", owner="quiet"))
    drain(q)
    for i in range(6):
        q.push(job(f"busy{i}", owner="busy"))
    for _ in range(3):
        q.take(drain_one(q))
    # "quiet" was idle while three of "busy" ran: it joins at the current turn, not ahead.
    q.push(job("back", owner="quiet"))
    q.push(job("back2", owner="quiet"))
    assert drain(q) == ["back", "busy3", "back2", "busy4", "busy5"]


def drain_one(q: JobQueues) -> str:
    nxt = q.peek("m")
    assert nxt is not None
    return nxt.id


def test_waiting_counts_per_key() -> None:
    q = JobQueues(["m", "n"])
    q.push(job("a", owner="ana"))
    q.push(job("b", owner="ana", model="n"))
    q.push(job("c"))
    assert (q.waiting("ana"), q.waiting(None), q.waiting("bo")) == (2, 1, 0)
    q.take("a")
    q.remove("c")
    assert (q.waiting("ana"), q.waiting(None)) == (1, 0)
