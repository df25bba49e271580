"""Safe to expose: API keys, per-key isolation, Idempotency-Keys bound to key and request,
rate limits, per-key queue caps, body and work limits. Through the HTTP app in process
(the tracker in the same loop, fake replicas); the guarantees that need several ingress
replicas are in tests/e2e/test_e2e_security.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.jobs.service import JobTracker
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings
from tests.support.fakes import FakeReplicas
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio
ANA, BO, OPS = "ana-key-0123456789abcdef", "bo-key-0123456789abcdef", "ops-key-0123456789abcd"
SMALL = {"prompt": "a lake", "width": 64, "height": 64, "steps": 2}


def keyed(settings: Settings, **overrides: Any) -> Settings:
    env = {"API_KEYS": f"ana:{ANA},bo:{BO},ops:{OPS}:admin"}
    base = settings.model_dump(exclude={"api_keys"})
    return load_settings(base | overrides, env=env)


@pytest.fixture
def replicas() -> FakeReplicas:
    return FakeReplicas()


async def app_for(registry: Registry, settings: Settings, replicas: FakeReplicas
                  ) -> tuple[httpx.AsyncClient, JobTracker]:
    tracker = make_tracker(registry, settings, replicas)
    return http_client(tracker, settings, registry), tracker


@pytest.fixture
async def client(registry: Registry, settings: Settings,
                 replicas: FakeReplicas) -> AsyncIterator[httpx.AsyncClient]:
    c, tracker = await app_for(registry, keyed(settings), replicas)
    async with c:
        yield c
    await tracker.close()


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def done(client: httpx.AsyncClient, job_id: str, key: str) -> dict[str, Any]:
    for _ in range(200):
        job = (await client.get(f"/jobs/{job_id}", headers=as_(key))).json()
        if job.get("status") in ("completed", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(job)


async def test_every_route_but_health_needs_a_valid_key(client) -> None:
    for method, path in (("GET", "/jobs"), ("GET", "/jobs/job_1_x"), ("GET", "/models"),
                         ("GET", "/queue/status"), ("POST", "/generate/text2img"),
                         ("POST", "/jobs/job_1_x/cancel"), ("GET", "/nowhere")):
        for headers in ({}, as_("wrong-key-0123456789"), {"X-API-Key": "nope"}):
            resp = await client.request(method, path, headers=headers, json=SMALL)
            assert resp.status_code == 401, (method, path, headers)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert resp.json().keys() == {"error"}
    assert "API key is required" in (await client.get("/jobs")).json()["error"]
    assert "not valid" in (await client.get("/jobs", headers=as_("x" * 20))).json()["error"]
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/jobs", headers={"X-API-Key": ANA})).status_code == 200
    lower = await client.get("/jobs", headers={"authorization": f"bearer {ANA}"})
    assert lower.status_code == 200


async def test_a_key_sees_only_its_own_jobs_and_an_admin_sees_all(client) -> None:
    mine = (await client.post("/generate/text2img", json=SMALL, headers=as_(ANA))).json()
    theirs = (await client.post("/generate/text2img", json=SMALL, headers=as_(BO))).json()
    await done(client, mine["id"], ANA)
    their = f"/jobs/{theirs['id']}"
    for method, path in (("GET", their), ("GET", f"{their}/events"),
                         ("GET", f"{their}/images/0"), ("POST", f"{their}/cancel")):
        resp = await client.request(method, path, headers=as_(ANA))
        assert (resp.status_code, resp.json()) == (404, {"error": "Job not found"}), path
    listed = (await client.get("/jobs", headers=as_(ANA))).json()["jobs"]
    assert [j["id"] for j in listed] == [mine["id"]]
    everything = (await client.get("/jobs", headers=as_(OPS))).json()["jobs"]
    assert {j["id"] for j in everything} == {mine["id"], theirs["id"]}
    assert (await client.get(f"/jobs/{theirs['id']}", headers=as_(OPS))).status_code == 200
    await done(client, theirs["id"], BO)
    ana = (await client.get("/queue/status", headers=as_(ANA))).json()
    ops = (await client.get("/queue/status", headers=as_(OPS))).json()
    assert (ana["completedJobs"], ops["completedJobs"]) == (1, 2)


async def test_idempotency_keys_are_per_api_key_and_bound_to_the_request(client) -> None:
    first = await client.post("/generate/text2img", json=SMALL,
                              headers=as_(ANA) | {"Idempotency-Key": "k1"})
    again = await client.post("/generate/text2img", json=dict(reversed(SMALL.items())),
                              headers=as_(ANA) | {"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]  # same request, keys in another order
    other = await client.post("/generate/text2img", json=SMALL | {"prompt": "another"},
                              headers=as_(ANA) | {"Idempotency-Key": "k1"})
    assert other.status_code == 409 and "different request" in other.json()["error"]
    # Another API key's k1 is its own: a new job, never ana's.
    bo = await client.post("/generate/text2img", json=SMALL,
                           headers=as_(BO) | {"Idempotency-Key": "k1"})
    assert bo.status_code == 202 and bo.json()["id"] != first.json()["id"]


async def test_submits_past_the_burst_get_429_with_rate_limit_headers(
        registry, settings, replicas) -> None:
    replicas.hold = asyncio.Event()
    client, tracker = await app_for(
        registry, keyed(settings, submit_rate=1, submit_burst=3, max_queue_size=100), replicas)
    async with client:
        codes = [(await client.post("/generate/text2img", json=SMALL,
                                    headers=as_(ANA))).status_code for _ in range(5)]
        assert codes == [202, 202, 202, 429, 429]
        resp = await client.post("/generate/text2img", json=SMALL, headers=as_(ANA))
        assert resp.headers["ratelimit-limit"] == "3"
        assert resp.headers["ratelimit-remaining"] == "0"
        assert int(resp.headers["retry-after"]) >= 1 == int(resp.headers["ratelimit-reset"])
        assert "Too many submits" in resp.json()["error"]
        # Another key has its own budget.
        assert (await client.post("/generate/text2img", json=SMALL,
                                  headers=as_(BO))).status_code == 202
    replicas.hold.set()
    await tracker.close()


async def test_reads_have_their_own_budget(registry, settings, replicas) -> None:
    client, tracker = await app_for(registry, keyed(settings, read_rate=1, read_burst=2),
                                    replicas)
    async with client:
        codes = [(await client.get("/jobs", headers=as_(ANA))).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert (await client.post("/generate/text2img", json=SMALL,
                                  headers=as_(ANA))).status_code == 202
    await tracker.close()


async def test_one_key_flooding_the_queue_gets_its_own_429_and_others_go_first(
        registry, settings, replicas) -> None:
    replicas.hold = asyncio.Event()
    client, tracker = await app_for(
        registry, keyed(settings, max_queued_per_key=5, submit_burst=100), replicas)
    async with client:
        flood = [(await client.post("/generate/text2img", json=SMALL | {"seed": i},
                                    headers=as_(ANA))) for i in range(8)]
        assert [r.status_code for r in flood] == [202] * 6 + [429] * 2  # one runs, 5 wait
        assert "This API key has 5 jobs waiting" in flood[-1].json()["error"]
        single = (await client.post("/generate/text2img", json=SMALL, headers=as_(BO))).json()
        assert single["queuePosition"] == 1  # ahead of ana's five
        replicas.hold.set()
        await done(client, single["id"], BO)
        order = [b[0] for b in replicas.batches]
        assert order.index(single["id"]) <= 2
    await tracker.close()


async def test_a_body_over_the_limit_is_413_before_it_is_read(registry, settings,
                                                            replicas) -> None:
    limits = settings.limits.model_copy(update={"max_body_bytes": 2000})
    client, tracker = await app_for(registry, keyed(settings, limits=limits.model_dump()),
                                    replicas)
    async with client:
        big = {"prompt": "x" * 3000}
        resp = await client.post("/generate/text2img", json=big, headers=as_(ANA))
        assert resp.status_code == 413 and "limit is 2000 bytes" in resp.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        resp = await client.post("/generate/text2img", content=chunks(),
                                 headers=as_(ANA) | {"content-type": "application/json"})
        assert resp.status_code == 413 and "over" in resp.json()["error"]
        # Unauthenticated: refused for the key first, still without reading the body.
        assert (await client.post("/generate/text2img", json=big)).status_code in (401, 413)
    await tracker.close()


async def test_a_request_asking_for_too_much_work_is_refused(client) -> None:
    resp = await client.post("/generate/text2img", headers=as_(ANA), json={
        "prompt": "x", "width": 1024, "height": 1024, "steps": 100, "numImages": 4})
    assert resp.status_code == 400
    assert "419 megapixel-steps, over the limit of 250" in resp.json()["error"]


async def test_event_streams_per_key_are_capped(registry, settings, replicas) -> None:
    replicas.hold = asyncio.Event()
    client, tracker = await app_for(registry, keyed(settings, max_streams_per_key=1), replicas)
    async with client:
        job = (await client.post("/generate/text2img", json=SMALL, headers=as_(ANA))).json()
        # httpx's in-process transport hands a response over only once it is complete, so
        # the first stream runs in a task until its job ends.
        first = asyncio.create_task(
            client.get(f"/jobs/{job['id']}/events", headers=as_(ANA)))
        await asyncio.sleep(0.05)  # the first stream is open
        second = await client.get(f"/jobs/{job['id']}/events", headers=as_(ANA))
        assert second.status_code == 429
        assert "event streams are open" in second.json()["error"]
        replicas.hold.set()
        assert (await first).status_code == 200
        again = await client.get(f"/jobs/{job['id']}/events", headers=as_(ANA))
        assert again.status_code == 200  # the first one closed with its job
    await tracker.close()


async def test_an_open_service_serves_without_keys(client_open) -> None:
    resp = await client_open.post("/generate/text2img", json=SMALL)
    assert resp.status_code == 202


@pytest.fixture
async def client_open(registry, settings, replicas) -> AsyncIterator[httpx.AsyncClient]:
    c, tracker = await app_for(registry, settings, replicas)
    async with c:
        yield c
    await tracker.close()


# -- priority is a privilege -------------------------------------------------------------


def test_a_keys_highest_priority_is_normal_for_users_high_for_admins_unless_given() -> None:
    from serve_app.credentials import parse_keys

    keys = {k.name: k for k in parse_keys(
        f"ana:{ANA},ops:{OPS}:admin,bo:{BO}:user:high,batch:{'b' * 20}:admin:low")}
    assert {n: k.highest for n, k in keys.items()} == {
        "ana": "normal", "ops": "high", "bo": "high", "batch": "low"}


async def test_a_priority_above_the_keys_highest_is_403_naming_it(client) -> None:
    refused = await client.post("/generate/text2img", json=SMALL | {"priority": "high"},
                                headers=as_(ANA))
    assert refused.status_code == 403
    assert refused.json() == {"error": "priority 'high' is above this API key's highest, "
                                       "'normal': send priority 'normal' or lower, or ask "
                                       "for a key with max_priority high"}
    for priority in ("low", "normal"):
        ok = await client.post("/generate/text2img", json=SMALL | {"priority": priority},
                               headers=as_(ANA))
        assert ok.status_code == 202, ok.text
    admin = await client.post("/generate/text2img", json=SMALL | {"priority": "high"},
                              headers=as_(OPS))
    assert admin.status_code == 202 and admin.json()["priority"] == "high"


async def test_keys_allowed_high_take_turns_at_high(registry, settings, replicas) -> None:
    """Two keys that may use `high`, one flooding: the other's job runs after at most one
    of the flood's, not after all of it."""
    env = {"API_KEYS": f"ana:{ANA}:user:high,bo:{BO}:user:high"}
    keyed_high = load_settings(settings.model_dump(exclude={"api_keys"}) | {
        "submit_rate": 0, "max_concurrent_jobs": 1}, env=env)
    replicas.hold = asyncio.Event()
    c, tracker = await app_for(registry, keyed_high, replicas)
    async with c:
        flood = [await c.post("/generate/text2img", json=SMALL | {"priority": "high",
                                                                  "seed": i},
                              headers=as_(ANA)) for i in range(5)]
        assert all(r.status_code == 202 for r in flood)
        mine = await c.post("/generate/text2img", json=SMALL | {"priority": "high"},
                            headers=as_(BO))
        assert mine.status_code == 202
        replicas.hold.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(replicas.started) == 6:
                break
    order = replicas.started
    assert order.index(mine.json()["id"]) <= 2, order  # the running one, one of ana's, bo's
    await tracker.close()
