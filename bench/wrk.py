"""Throughput with `wrk` (C, epoll; Debian's package): a load generator far cheaper than the
servers it drives here, so a throughput figure measures the server, not the client.

On this 2-core machine the load generator shares the cores with the server: the asyncio
client of `bench.loadgen` costs ~0.14 ms of CPU per request, wrk a fraction of that
(FIELD_NOTES: wrk drives bare Starlette at 6,000-8,800 POST/s where a Python client tops out
near 250-1,400/s). wrk runs with one thread (one core's worth of client at most) and a Lua
script that sends the request and counts response statuses; its `done` hook prints the
run as one JSON line, which `run_wrk` parses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_SCRIPT = r"""
wrk.method = %(method)s
wrk.body = %(body)s
%(headers)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do counts[code] = (counts[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do table.insert(parts, string.format('"%%d":%%d', code, n)) end
  io.write(string.format(
    'WRK_JSON {"requests":%%d,"duration_us":%%d,"connect_errors":%%d,"read_errors":%%d,' ..
    '"write_errors":%%d,"timeouts":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"statuses":{%%s}}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, table.concat(parts, ",")))
end
"""


@dataclass(frozen=True)
class WrkResult:
    connections: int
    window_s: float
    requests: int
    statuses: dict[int, int]
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def ok(self, status: int) -> int:
        return self.statuses.get(status, 0)

    def per_s(self, status: int) -> float:
        return self.ok(status) / self.window_s if self.window_s else 0.0


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for our bodies


def run_wrk(base_url: str, method: str, path: str, body: bytes | None = None, *,
            headers: dict[str, str] | None = None, connections: int = 16,
            duration_s: float = 8.0, threads: int = 1, timeout_s: float = 10.0) -> WrkResult:
    """One wrk run of `connections` keep-alive connections for `duration_s` (loopback only)."""
    parts = urlsplit(base_url)
    if parts.hostname != "127.0.0.1":
        raise ValueError(f"benchmarks stay on loopback: {base_url!r}")
    if not available():
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    all_headers = {"Content-Type": "application/json"} | (headers or {})
    header_lines = "\n".join(f"wrk.headers[{_lua(k)}] = {_lua(v)}"
                             for k, v in all_headers.items())
    script = _SCRIPT % {"method": _lua(method), "body": _lua((body or b"").decode()),
                        "headers": header_lines}
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "bench.lua"
        lua.write_text(script)
        done = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
             f"--timeout={timeout_s:g}s", "-s", str(lua), base_url.rstrip("/") + path],
            capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return WrkResult(
        connections=connections, window_s=data["duration_us"] / 1e6,
        requests=data["requests"],
        statuses={int(k): v for k, v in data["statuses"].items()}, errors=errors,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000)
