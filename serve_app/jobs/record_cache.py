"""Rendered job records kept in memory, least recently used first out, bounded in bytes.

The tracker's book keeps finished jobs' records (`JobBook`), an ingress those it read from
the store (`StoreReads`): a record carries its images, so the bound is on their bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class RecordCache(Generic[V]):
    """job id -> (a value, the rendered record it goes with)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[V, bytes]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes of the records held."""
        return self._bytes

    def records(self) -> list[bytes]:
        return [record for _, record in self._entries.values()]

    def get(self, job_id: str) -> tuple[V, bytes] | None:
        entry = self._entries.get(job_id)
        if entry is not None:
            self._entries.move_to_end(job_id)
        return entry

    def put(self, job_id: str, value: V, record: bytes) -> None:
        self.pop(job_id)
        self._entries[job_id] = (value, record)
        self._bytes += len(record)
        while self._bytes > self._max_bytes and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def pop(self, job_id: str) -> None:
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
