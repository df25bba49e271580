"""`GET /readyz`'s answer: whether the tracker and the job store answer, asked at most once
a second per ingress replica however many probes come (one check in flight; its answer,
good or bad, is reused for `ttl_s`), so load balancers and Kubernetes can probe as often
as they like without reaching the tracker per probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from serve_app.api.backend import JobsBackend
from serve_app.errors import ServiceError, ServiceUnavailable


class Readiness:
    def __init__(self, backend: JobsBackend, ttl_s: float = 1.0, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backend = backend
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._answer: dict[str, str] | ServiceError | None = None
        self._at = float("-inf")
        self._checking: asyncio.Task[dict[str, str] | ServiceError] | None = None

    async def check(self) -> dict[str, str]:
        """The last answer if it is fresh, else one check's (shared by concurrent callers);
        a ServiceUnavailable when the service is not ready."""
        if self._answer is None or self._clock() - self._at >= self._ttl_s:
            if self._checking is None:
                self._checking = asyncio.create_task(self._ask())
            checking = self._checking
            answer = await asyncio.shield(checking)
            if self._checking is checking:
                self._answer, self._at, self._checking = answer, self._clock(), None
        answer = self._answer
        if isinstance(answer, ServiceError):
            raise answer
        assert answer is not None
        return {"status": "ready", **answer}

    async def _ask(self) -> dict[str, str] | ServiceError:
        try:
            return await asyncio.wait_for(self._backend.ready(), self._timeout_s)
        except ServiceError as exc:
            return ServiceUnavailable(f"Not ready: {exc.message}", retry_after_s=1)
        except Exception as exc:  # a timeout, a dead tracker: not ready, say which
            return ServiceUnavailable(f"Not ready: the job tracker did not answer "
                                      f"({type(exc).__name__})", retry_after_s=1)
