"""Waiting jobs, one priority queue per model: higher priority first, FIFO within one.

Only jobs the tracker has not yet handed to a replica are here; the count of them is what
MAX_QUEUE_SIZE bounds. Removal (a cancel, a job leaving with another's batch) is lazy: the
entry is marked dead and skipped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from serve_app.jobs.job import Job


@dataclass(order=True)
class _Entry:
    rank: int
    sequence: int
    job: Job = field(compare=False)
    alive: bool = field(default=True, compare=False)


class JobQueues:
    def __init__(self, models: Iterable[str]) -> None:
        self._heaps: dict[str, list[_Entry]] = {m: [] for m in models}
        self._entries: dict[str, _Entry] = {}
        self._sequence = 0
        self._counts: dict[tuple[str, int], int] = {}  # waiting jobs per (model, rank)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def models(self) -> list[str]:
        return list(self._heaps)

    def push(self, job: Job) -> int:
        """Queue `job`; returns its position, which a new job gets in O(1): it is last
        of its priority, behind every job of a higher or equal one."""
        self._sequence += 1
        entry = _Entry(job.priority.rank, self._sequence, job)
        self._entries[job.id] = entry
        heapq.heappush(self._heaps[job.model], entry)
        slot = (job.model, entry.rank)
        self._counts[slot] = self._counts.get(slot, 0) + 1
        return sum(n for (model, rank), n in self._counts.items()
                   if model == job.model and rank <= entry.rank)

    def remove(self, job_id: str) -> bool:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        entry.alive = False
        self._counts[(entry.job.model, entry.rank)] -= 1
        return True

    def peek(self, model: str) -> Job | None:
        """The job `pop` would return, left in place."""
        heap = self._heaps[model]
        while heap and not heap[0].alive:
            heapq.heappop(heap)
        return heap[0].job if heap else None

    def pop(self, model: str) -> Job | None:
        job = self.peek(model)
        if job is not None:
            heapq.heappop(self._heaps[model])
            self.remove(job.id)
        return job

    def matching(
        self, model: str, key: Hashable, key_of: Callable[[Job], Hashable], limit: int
    ) -> list[Job]:
        """Up to `limit` waiting jobs of `model` whose key equals `key`, in queue order."""
        found: list[Job] = []
        if limit <= 0:
            return found
        for entry in sorted(self._heaps[model]):
            if entry.alive and key_of(entry.job) == key:
                found.append(entry.job)
                if len(found) == limit:
                    break
        return found

    def position(self, job: Job) -> int | None:
        """1-based place among the model's waiting jobs; None when it is not waiting."""
        if job.id not in self._entries:
            return None
        ahead = self._entries[job.id]
        return 1 + sum(1 for e in self._heaps[job.model] if e.alive and e < ahead)
