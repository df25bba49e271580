"""Waiting jobs, one priority queue per model: higher priority first; within a priority, the
API keys take turns (start-time fair queueing, by key weight); FIFO within one key.

Each job gets a virtual start tag when it is queued: its key's previous finish tag, or the
queue's virtual time if that is later (a key that was idle does not bank credit), plus
`1 / weight` per job for the key's next one. Jobs leave in (priority, tag) order, and the
virtual time follows the tag of the last job to leave. So a key that queued 100 jobs holds
tags 1..100 ahead, and a key that then queues one job gets the next free tag: it runs after
at most one job of each other key, not after all 100.

Only jobs not yet handed to a replica are here; their number is what MAX_QUEUE_SIZE
bounds, and each key's what its own cap bounds. Each model's queue is a sorted list
(sortedcontainers): the next job, a job's position, adding and removing are each O(log n),
which keeps a submit's answer (it carries the position) cheap behind a long queue.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping

from sortedcontainers import SortedKeyList

from serve_app.jobs.job import Job
from serve_app.messages import Priority

# (priority rank, virtual start tag, arrival sequence): the order jobs leave in.
_Key = tuple[int, float, int]


class _Entry:
    __slots__ = ("job", "key")

    def __init__(self, job: Job, key: _Key) -> None:
        self.job = job
        self.key = key


def _key(entry: _Entry) -> _Key:
    return entry.key


class JobQueues:
    def __init__(self, models: Iterable[str], weights: Mapping[str, float] | None = None
                 ) -> None:
        self._lists: dict[str, SortedKeyList] = {m: SortedKeyList(key=_key) for m in models}
        self._entries: dict[str, _Entry] = {}
        self._sequence = 0
        self._weights = dict(weights or {})
        self._virtual: dict[tuple[str, int], float] = {}  # (model, rank) -> virtual time
        self._finish: dict[tuple[str, int, str], float] = {}  # ... and key -> its next tag
        self._waiting: Counter[str] = Counter()  # waiting jobs per key
        self._depths: Counter[tuple[str, Priority]] = Counter()  # per model and priority

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def models(self) -> list[str]:
        return list(self._lists)

    def depths(self) -> list[tuple[str, Priority, int]]:
        """Waiting jobs per model and priority, every model and priority named."""
        return [(model, priority, self._depths[(model, priority)])
                for model in self._lists for priority in Priority]

    def waiting(self, owner: str | None) -> int:
        """Jobs of one key (None: the anonymous caller) waiting, across models."""
        return self._waiting[owner or ""]

    def push(self, job: Job) -> None:
        owner = job.owner or ""
        rank = job.priority.rank
        virtual = self._virtual.get((job.model, rank), 0.0)
        start = max(virtual, self._finish.get((job.model, rank, owner), 0.0))
        self._finish[(job.model, rank, owner)] = start + 1.0 / self._weights.get(owner, 1.0)
        self._sequence += 1
        entry = _Entry(job, (rank, start, self._sequence))
        self._entries[job.id] = entry
        self._waiting[owner] += 1
        self._depths[(job.model, job.priority)] += 1
        self._lists[job.model].add(entry)

    def take(self, job_id: str) -> None:
        """`job_id` leaves for a replica: the queue's virtual time moves to its tag."""
        entry = self._entries.get(job_id)
        if entry is not None:
            rank, tag, _ = entry.key
            slot = (entry.job.model, rank)
            self._virtual[slot] = max(self._virtual.get(slot, 0.0), tag)
            if len(self._finish) > 1024:
                self._forget_idle_keys()
        self.remove(job_id)

    def _forget_idle_keys(self) -> None:
        """A key whose next tag is behind the virtual time gets the virtual time anyway."""
        for (model, rank, owner), tag in list(self._finish.items()):
            if tag <= self._virtual.get((model, rank), 0.0):
                del self._finish[(model, rank, owner)]

    def remove(self, job_id: str) -> bool:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        self._lists[entry.job.model].remove(entry)
        self._depths[(entry.job.model, entry.job.priority)] -= 1
        self._waiting[entry.job.owner or ""] -= 1
        if not self._waiting[entry.job.owner or ""]:
            del self._waiting[entry.job.owner or ""]
        return True

    def peek(self, model: str) -> Job | None:
        """The job that would leave next, left in place."""
        queue = self._lists[model]
        return queue[0].job if queue else None

    def matching(
        self, model: str, key: Hashable, key_of: Callable[[Job], Hashable], limit: int
    ) -> list[Job]:
        """Up to `limit` waiting jobs of `model` whose key equals `key`, in queue order."""
        found: list[Job] = []
        if limit <= 0:
            return found
        for entry in self._lists[model]:
            if key_of(entry.job) == key:
                found.append(entry.job)
                if len(found) == limit:
                    break
        return found

    def position(self, job: Job) -> int | None:
        """1-based place among the model's waiting jobs; None when it is not waiting."""
        entry = self._entries.get(job.id)
        if entry is None:
            return None
        return 1 + self._lists[job.model].bisect_key_left(entry.key)
