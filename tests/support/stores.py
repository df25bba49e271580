"""Job stores for tests: a real Redis (when one is given), and stores that fail on purpose."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest
import redis

from serve_app.errors import StoreTimeout, StoreUnavailable
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.stores.contract import JobRow, JobStore
from serve_app.stores.memory import MemoryStore
from serve_app.stores.redis import RedisStore

T = TypeVar("T")
REDIS_URL = os.environ.get("IMAGEGEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_store(namespace: str = "imagegen-test") -> RedisStore:
    """A Redis store on IMAGEGEN_TEST_REDIS_URL, its database flushed first. Without a
    server the test is skipped, except under CI (`CI` set), where it fails: CI starts one."""
    probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        probe.ping()
        probe.flushdb()
    except redis.ConnectionError as exc:
        reason = f"no Redis server at {REDIS_URL} ({exc}); set IMAGEGEN_TEST_REDIS_URL to one"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}. CI must start one.")
        pytest.skip(reason)
    finally:
        probe.close()
    return RedisStore(REDIS_URL, namespace=namespace)


class FlakyStore(MemoryStore):
    """Fails the next `failures` saves, like a Redis blip or a busy SQLite file; the next
    `late` saves land but answer too late (a timeout: the caller cannot tell)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.late = 0

    def save_many(self, rows: Sequence[JobRow], *, durable: bool = False) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store blip")
        super().save_many(rows, durable=durable)
        if self.late > 0:
            self.late -= 1
            raise StoreTimeout("The job store did not answer within 3 s; retry shortly")


class DownStore(InlineStoreCalls):
    """The ingress's way to a store that does not answer."""

    async def read(self, call: Callable[[JobStore], T]) -> T:
        raise StoreUnavailable("The job store is unavailable; retry shortly")
