"""Safe to expose, end to end: the real Ray Serve app on loopback with three API keys and
two ingress replicas behind Serve's HAProxy. Each request opens its own connection, so
HAProxy spreads them over both replicas: a limit that held per replica would let twice as
much through."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.chaos import until
from tests.support.serve_harness import ServeHarness, wait_for

pytestmark = pytest.mark.e2e

ANA, BO, OPS = "ana-0123456789abcdef", "bo-0123456789abcdef", "ops-0123456789abcdef"
FLOOD, BURST = "flood-0123456789abcdef", "burst-0123456789abcdef"
KEYS = f"ana:{ANA},bo:{BO},ops:{OPS}:admin,flood:{FLOOD},burst:{BURST}"
SMALL = {"prompt": "a lake", "width": 64, "height": 64, "steps": 2}
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def url(serve_harness: ServeHarness) -> str:
    serve_harness.deploy(ingress_replicas=2, api_keys=KEYS, submit_rate=1, submit_burst=20,
                         limits={"max_body_bytes": MAX_BODY})
    return serve_harness.url


def call(url: str, method: str, path: str, key: str | None = None, **kwargs: Any
         ) -> httpx.Response:
    """One request on a connection of its own (HAProxy balances per connection)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers |= kwargs.pop("headers", {})
    return httpx.request(method, url + path, headers=headers, timeout=60, **kwargs)


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {OPS}"}) as c:
        yield c


def test_no_key_and_a_wrong_key_are_401(url: str) -> None:
    for key in (None, "not-a-key-0123456789"):
        resp = call(url, "GET", "/jobs", key)
        assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        assert set(resp.json()) == {"error"}
    assert call(url, "GET", "/healthz").status_code == 200


def test_another_keys_job_is_invisible(url: str, client: httpx.Client) -> None:
    job = call(url, "POST", "/generate/text2img", ANA, json=SMALL).json()
    wait_for(client, job["id"])
    for method, path in (("GET", f"/jobs/{job['id']}"), ("GET", f"/jobs/{job['id']}/images/0"),
                         ("GET", f"/jobs/{job['id']}/events"),
                         ("POST", f"/jobs/{job['id']}/cancel")):
        resp = call(url, method, path, BO)
        assert (resp.status_code, resp.json()) == (404, {"error": "Job not found"}), path
    assert job["id"] not in [j["id"] for j in call(url, "GET", "/jobs", BO).json()["jobs"]]
    assert job["id"] in [j["id"] for j in call(url, "GET", "/jobs", ANA).json()["jobs"]]
    assert call(url, "GET", f"/jobs/{job['id']}/images/0", ANA).status_code == 200
    assert call(url, "GET", f"/jobs/{job['id']}", OPS).status_code == 200  # admin


def test_a_reused_idempotency_key_with_another_body_is_409(url: str) -> None:
    key = {"Idempotency-Key": f"k-{time.time_ns()}"}
    first = call(url, "POST", "/generate/text2img", BO, json=SMALL, headers=key)
    again = call(url, "POST", "/generate/text2img", BO, json=SMALL, headers=key)
    other = call(url, "POST", "/generate/text2img", BO, json=SMALL | {"seed": 5}, headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 409 and "different request" in other.json()["error"]


def test_a_burst_past_the_rate_limit_is_429_across_both_replicas(url: str) -> None:
    started = time.monotonic()
    codes = [call(url, "POST", "/generate/text2img", BURST, json=SMALL).status_code
             for _ in range(40)]
    elapsed = time.monotonic() - started
    accepted = codes.count(202)
    # 20 in the bucket, plus what refilled at 1/s while the burst was sent; buckets per
    # replica (two of them) would have let all 40 through.
    assert set(codes) == {202, 429}, codes
    assert 20 <= accepted <= 20 + int(elapsed) + 1, (codes, elapsed)
    # The bucket stays empty but for its refill of one a second: of a few more calls at
    # once, one may take a token that refilled meanwhile, the rest are refused.
    started = time.monotonic()
    more = [call(url, "POST", "/generate/text2img", BURST, json=SMALL) for _ in range(4)]
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in more]
    assert codes.count(202) <= 1 + int(elapsed) and 429 in codes, (codes, elapsed)
    refused = next(r for r in more if r.status_code == 429)
    assert {"retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(
        refused.headers)


def test_oversized_and_chunked_oversized_bodies_are_413(url: str) -> None:
    big = {"prompt": "x" * (MAX_BODY + 10)}
    resp = call(url, "POST", "/generate/text2img", ANA, json=big)
    assert resp.status_code == 413 and "limit is" in resp.json()["error"]

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"y" * 10_000
        yield b'"}'

    resp = call(url, "POST", "/generate/text2img", ANA, content=chunks(),
                headers={"content-type": "application/json"})
    assert resp.status_code == 413 and set(resp.json()) == {"error"}


def test_a_flood_from_one_key_does_not_hold_back_another_keys_job(
        url: str, client: httpx.Client) -> None:
    slow = SMALL | {"width": 128, "height": 128, "steps": 20}
    flood = [call(url, "POST", "/generate/text2img", FLOOD, json=slow | {"seed": i}).json()
             for i in range(20)]
    single = call(url, "POST", "/generate/text2img", ANA, json=slow).json()
    assert single["queuePosition"] <= 2
    done = wait_for(client, single["id"], timeout_s=120)
    assert done["status"] == "completed"
    finished = [wait_for(client, j["id"], timeout_s=180) for j in flood]
    ahead = [j for j in finished if j["completedAt"] < done["completedAt"]]
    assert len(ahead) <= 8, f"{len(ahead)} of the flood finished first"  # two calls' worth


def test_one_scrape_counts_what_both_ingress_replicas_served(url: str) -> None:
    from tests.support.metrics import samples, value

    def queue_status_hits() -> float:
        m = samples(call(url, "GET", "/metrics", OPS).text)
        return value(m, "imagegen_http_requests_total", route="/queue/status", method="GET",
                     status="200")

    before = queue_status_hits()
    for _ in range(12):  # a connection each: HAProxy spreads them over both replicas
        assert call(url, "GET", "/queue/status", OPS).status_code == 200
    # Each replica reports its requests about once a second: wait for all 12, no more.
    counted = until(lambda: (n := queue_status_hits() - before) >= 12 and n, 15.0,
                    "12 requests counted")
    assert counted == 12
    job = call(url, "POST", "/generate/text2img", OPS, json=SMALL).json()
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {OPS}"}) as client:
        wait_for(client, job["id"])
    m = samples(call(url, "GET", "/metrics", OPS).text)
    assert value(m, "imagegen_jobs_total", status="completed", type="text2img",
                 model="tiny-sd") >= 1
    assert value(m, "imagegen_job_run_seconds_count", model="tiny-sd") >= 1
