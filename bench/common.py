"""What every benchmark shares: statistics, machine facts, the inline model registry
entries, job polling, and CPU time by process.

Load generators (`bench.loadgen`) only ever talk to 127.0.0.1 and are bounded in
clients, requests and time. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen import Client

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = frozenset({"completed", "failed", "cancelled"})


def log(message: str) -> None:
    """Progress goes to stderr: stdout ends with the JSON summary."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(seconds: list[float]) -> dict[str, float | int | None]:
    """p50 / p90 / p99 / mean / min / max in milliseconds, and the sample count."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": rnd(percentile(ms, 50)),
        "p90_ms": rnd(percentile(ms, 90)),
        "p99_ms": rnd(percentile(ms, 99)),
        "mean_ms": rnd(statistics.fmean(ms)) if ms else None,
        "min_ms": rnd(min(ms)) if ms else None,
        "max_ms": rnd(max(ms)) if ms else None,
    }


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in (
            "torch", "ray", "diffusers", "transformers", "fastapi", "starlette", "uvicorn",
            "httpx")},
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": load_average(),
    }


# -- the models the benchmarks deploy (inline registry entries) -------------------------


def shipped_model(model_id: str, *, num_cpus: float | None = None,
                  **scaling: Any) -> dict[str, Any]:
    """A registry entry as config/models.yaml ships it; `num_cpus` and `scaling` keys
    override it for a labelled variant. Its inpainting model is not deployed here."""
    from serve_app.registry import load_registry

    entry = load_registry(ROOT / "config" / "models.yaml").get(model_id).model_dump(
        exclude_none=True, mode="json")
    entry.pop("inpainting_model", None)
    entry["scaling"] = entry.get("scaling", {}) | scaling
    if num_cpus is not None:
        entry["resources"] = entry.get("resources", {}) | {"num_cpus": num_cpus}
    return entry


def tiny_model(model_id: str, *, num_cpus: float = 1.0, **scaling: Any) -> dict[str, Any]:
    """A registry entry for the embedded tiny model under its own id (its own weights
    folder in the cache dir, its own deployment)."""
    return {
        "id": model_id,
        "name": f"{model_id} (benchmark)",
        "description": "The embedded tiny model, deployed for a benchmark.",
        "type": "base",
        "version": "tiny-1",
        "source": "tiny",
        "defaults": {"width": 64, "height": 64, "steps": 1, "guidance_scale": 7.5,
                     "sampler": "euler_a"},
        "scaling": {"min_replicas": 1, "max_replicas": 1} | scaling,
        "resources": {"num_cpus": num_cpus},
    }


# -- jobs and processes -------------------------------------------------------------------


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (psutil)."""
    import psutil

    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def cpu_ms_per(before: dict[str, float], after: dict[str, float], count: int,
               elapsed_s: float = 0.0, idle: dict[str, float] | None = None
               ) -> dict[str, float | None]:
    """CPU milliseconds per request (or job) for each process and their total; with
    `idle` (CPU s/s at rest), the background work over `elapsed_s` is taken out first."""
    idle = idle or {}
    per: dict[str, float | None] = {}
    for role in before:
        if role in after and count:
            used = after[role] - before[role] - idle.get(role, 0.0) * elapsed_s
            per[role] = rnd(1000 * max(0.0, used) / count)
    per["total"] = rnd(sum(v for v in per.values() if v is not None))
    return per


def wait_job(client: Client, job_id: str, *, timeout_s: float = 300
             ) -> tuple[dict[str, Any], float]:
    """Wait for the job to end on its event stream (GET /jobs/:id/events); returns the
    final record (without images) and the perf_counter time the client saw it.

    Not by polling GET /jobs/:id: on two cores every poll takes CPU (proxy, ingress,
    tracker) from the job being measured. The stream is pushed (a change reaches it within
    ~50 ms); the figures still time jobs by the record's own timestamps."""
    old = client.timeout_s
    client.timeout_s = timeout_s
    try:
        job = client.events(f"/jobs/{job_id}/events", lambda j: j["status"] in TERMINAL)
    finally:
        client.timeout_s = old
    return job, time.perf_counter()


def wait_all(client: Client, job_ids: list[str], *, timeout_s: float = 300,
             poll_s: float = 0.25) -> list[dict[str, Any]]:
    """Wait for several jobs with one GET /jobs every `poll_s` (newest first, so the
    page holds them), then fetch each record once."""
    pending = set(job_ids)
    deadline = time.perf_counter() + timeout_s
    while pending:
        _, page = client.get(f"/jobs?limit={min(500, max(100, 2 * len(job_ids)))}")
        pending -= {j["id"] for j in page["jobs"] if j["status"] in TERMINAL}
        if not pending:
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(pending)} job(s) not done after {timeout_s}s")
        time.sleep(poll_s)
    return [client.get(f"/jobs/{job_id}")[1] for job_id in job_ids]


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second each process burns with no requests (timers, health checks,
    the tracker's replica refresh...): subtracted from per-request figures."""
    before = cpu_seconds(pids)
    time.sleep(seconds)
    after = cpu_seconds(pids)
    return {role: (after[role] - before[role]) / seconds for role in before if role in after}


def wait_quiet(below_pct: float = 20.0, max_s: float = 30.0) -> None:
    """Wait until the machine's CPU use over one second is under `below_pct` (of all
    cores), at most `max_s`: what the previous figure started (a redeploy's old replicas
    stopping, a model scaling down, the store's checkpoint) must not land in the next."""
    import psutil

    t0 = time.perf_counter()
    busy = psutil.cpu_percent(interval=1.0)
    while busy >= below_pct and time.perf_counter() - t0 < max_s:
        busy = psutil.cpu_percent(interval=1.0)
    log(f"quiet after {time.perf_counter() - t0:.1f} s ({busy}% CPU)")


def wait_http(url: str, timeout_s: float = 120) -> None:
    """Until GET `url` answers 200."""
    base, _, path = url.partition("://")[2].partition("/")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with Client(f"http://{base}", timeout_s=5) as client:
                if client.get("/" + path)[0] == 200:
                    return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s ({last})")


def submit(client: Client, body: dict[str, Any]) -> str:
    """POST a text2img job; its id."""
    status, record = client.post("/generate/text2img", body)
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {record}")
    return str(record["id"])


def iso_ms(stamp: str | None) -> int | None:
    """The wire's `2025-11-07T10:00:00.000Z` as unix milliseconds."""
    if not stamp:
        return None
    dt = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=False, default=str)
