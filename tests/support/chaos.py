"""What the end-to-end fault tests share: deploying an app shape once, killing a
deployment's replica outright and waiting for Serve's replacement, and the API as a client
uses it while the service recovers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from tests.support.serve_harness import APP_NAME, TERMINAL, ServeHarness

# Enough for a kill, a replica restart (torch import on two busy cores) and a re-run.
RECOVERY_S = 180


# -- deployment and actors -------------------------------------------------------------------

_running: dict[str, dict[str, Any]] = {}  # harness url -> what deploy() was last given


def deployed(harness: ServeHarness, **args: Any) -> None:
    """Make the app run as `harness.deploy(**args)` deploys it (the defaults when no args),
    redeploying only when that differs from what this module deployed last."""
    if _running.get(harness.url, {}) != args:
        harness.deploy(**args)
        _running[harness.url] = args


def replica_actors(deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment of the app (GCS, no dashboard)."""
    import ray

    marker = f"::{APP_NAME}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and marker in a["name"])


def kill_replica(deployment: str) -> str:
    """Kill the one replica of `deployment` outright (no graceful stop, no Ray restart):
    only Serve's controller can bring it back. Returns the killed actor's name."""
    import ray

    [name] = replica_actors(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def replaced(killed: str) -> str:
    """Wait until Serve has started another replica in place of the actor `killed`."""
    deployment = killed.split("#")[1]

    def check() -> str | None:
        names = [n for n in replica_actors(deployment) if n != killed]
        return names[0] if names else None
    return str(until(check, RECOVERY_S, f"a replica in place of {killed}", 0.2))


# -- the API as a client uses it -------------------------------------------------------------


def post(client: httpx.Client, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/generate/text2img", json={"prompt": "a lighthouse"} | body,
                       headers=headers)


def submit(client: httpx.Client, key: str | None = None, **body: Any) -> dict[str, Any]:
    resp = post(client, key, **body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not {what} after {timeout_s}s")


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    resp = client.get(f"/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def running(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """Wait until the job is processing and has made progress (a step has run)."""
    def check() -> dict[str, Any] | None:
        record = job(client, job_id)
        assert record["status"] in ("queued", "processing"), record
        return record if record["status"] == "processing" and record["progress"] > 0 else None
    return until(check, timeout_s, f"{job_id} processing with progress")


def tolerant_get(client: httpx.Client, job_id: str, errors: list[str]) -> dict[str, Any] | None:
    """GET a job while the service recovers: a transport error or 5xx is noted, not fatal."""
    try:
        resp = client.get(f"/jobs/{job_id}", timeout=10)
    except httpx.TransportError as exc:
        errors.append(f"{type(exc).__name__}")
        return None
    if resp.status_code >= 500:
        errors.append(f"{resp.status_code} {resp.text[:120]}")
        return None
    assert resp.status_code == 200, resp.text
    return resp.json()


def all_terminal(client: httpx.Client, ids: list[str], timeout_s: float,
                 errors: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every job's final record; tolerant of a recovering service when `errors` is given."""
    final: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        for job_id in ids:
            if job_id in final:
                continue
            record = (tolerant_get(client, job_id, errors) if errors is not None
                      else job(client, job_id))
            if record is None:
                return False
            if record["status"] not in TERMINAL:
                return False
            final[job_id] = record
        return True

    until(check, timeout_s, f"all of {len(ids)} jobs terminal ({len(final)} were)", 0.2)
    return final


def stats(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/queue/status")
    assert resp.status_code == 200, resp.text
    return resp.json()


def idle(client: httpx.Client, timeout_s: float) -> dict[str, Any]:
    """Wait until nothing is queued or processing; the queue statistics then."""
    def check() -> dict[str, Any] | None:
        s = stats(client)
        return s if s["queuedJobs"] == s["processingJobs"] == 0 else None
    return until(check, timeout_s, "idle", 0.25)


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def replica_of(record: dict[str, Any]) -> str:
    """`tiny-sd#<unique id>`, as the replica names itself in a result."""
    return str(record["result"]["parameters"]["replica"])


# -- tests on the default deployment ---------------------------------------------------------
