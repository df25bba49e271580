"""Lean HTTP/1.1 clients for the load generators, loopback only.

Why not httpx: on this 2-core machine the client shares the cores with the server, so its
CPU per request is taken from the server. Measured against the baseline app: httpx's
AsyncClient spent ~5.6 ms of CPU per request (~135 req/s at 16 clients, the server 70%
idle), its sync Client ~1 ms; a keep-alive connection on asyncio streams 0.14 ms
(~1,370 req/s), `http.client` 0.16 ms. So the closed-loop generator speaks HTTP/1.1 on
asyncio streams, and the pollers use `http.client`.

Both understand exactly what the servers here send: a status line, headers, and a body
with Content-Length or chunked transfer encoding (server-sent events included).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_REQUESTS = 200_000  # hard bound on any one load run


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    if parts.hostname != "127.0.0.1" or parts.port is None:
        raise ValueError(f"benchmarks stay on loopback: {base_url!r}")
    return parts.hostname, parts.port


class AsyncConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams."""

    def __init__(self, base_url: str) -> None:
        self.host, self.port = _address(base_url)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        try:
            return await self._response(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(chunks)
        else:
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


@dataclass
class LoadResult:
    """A closed-loop run: every client sends its next request when the last one returns."""

    clients: int
    window_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    all_requests: int = 0  # warm-up included: what CPU-time deltas cover

    def ok(self, status: int) -> int:
        return self.statuses.get(status, 0)


async def closed_loop(base_url: str, method: str, path: str, body: bytes | None, *,
                      clients: int, duration_s: float, warmup_s: float) -> LoadResult:
    """`clients` connections, each sending its next request when the last returns, for
    warm-up + duration seconds; only requests started inside the window count."""
    result = LoadResult(clients=clients, window_s=duration_s)
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s

    async def client_loop() -> None:
        conn = AsyncConnection(base_url)
        try:
            while (t0 := time.perf_counter()) < stop_at and result.all_requests < MAX_REQUESTS:
                try:
                    status, _ = await asyncio.wait_for(conn.request(method, path, body), 30)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    status = -1
                t1 = time.perf_counter()
                result.all_requests += 1
                if t0 >= measure_from:
                    result.latencies.append(t1 - t0)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    result.errors += status == -1
        finally:
            await conn.close()

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return result


class Client:
    """A blocking keep-alive client on `http.client`, for pollers and one-at-a-time
    requests. JSON in, (status, JSON) out."""

    def __init__(self, base_url: str, timeout_s: float = 60,
                 headers: dict[str, str] | None = None) -> None:
        self.host, self.port = _address(base_url)
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})  # sent with every request (an API key)
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = self.headers | ({"Content-Type": "application/json"} if body is not None
                                  else {})
        for attempt in (1, 2):  # once more on a connection the server closed
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout_s)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        text = data.decode()
        return resp.status, (json.loads(text) if text else None)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        return self.request("POST", path, payload)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def events(self, path: str, until: Any) -> dict[str, Any]:
        """Read a server-sent-events stream on a connection of its own until a `data:`
        payload satisfies `until(payload)`; that payload."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"GET {path} answered {resp.status}: {resp.read()[:200]!r}")
            for line in resp:
                if line.startswith(b"data: "):
                    payload = json.loads(line[6:])
                    if until(payload):
                        return dict(payload)
            raise RuntimeError(f"the event stream {path} ended early")
        finally:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
