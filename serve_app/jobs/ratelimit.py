"""Token buckets per caller: `rate` requests a second on average, `burst` at once.

Submits and the reads that reach the tracker are limited there, the one actor every ingress
replica calls, so a key's budget is shared by all replicas at no extra hop: the call being
limited is already on its way there. Job reads an ingress answers from the store are limited
in that replica, at its share of the budget (`serve_app.api.direct_reads`). An idle caller's
bucket refills and is then forgotten.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, what: str, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str) -> None:
        """Spend one token of `client`'s bucket; RateLimited (with when to retry) if empty.
        A rate of 0 means no limit."""
        if self.rate <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            wait_s = max(1, math.ceil((1 - bucket.tokens) / self.rate))
            raise RateLimited(
                f"Too many {self.what}: this key may make {self.rate:g} a second on average "
                f"(bursts of {self.burst}); retry in {wait_s} s", retry_after_s=wait_s,
                limit=self.burst)
        bucket.tokens -= 1

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold nothing a new bucket would not."""
        full = [c for c, b in self._buckets.items()
                if b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]
