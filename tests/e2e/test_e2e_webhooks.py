"""Webhooks end to end: the real Ray Serve app on loopback (tracker actor, tiny model) sends
a job's webhook to a receiver on 127.0.0.1 that refuses the first attempt and verifies
every signature with the `standardwebhooks` package."""

from __future__ import annotations

import time

import pytest

from tests.support.serve_harness import ServeHarness, wait_for
from tests.support.webhook_receiver import SECRET, body_of, receiver

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def harness(local_ray) -> ServeHarness:  # type: ignore[no-untyped-def]
    """The session's Ray + Serve, deployed once with webhooks on (the shared
    `serve_harness` fixture would deploy the default app first)."""
    harness: ServeHarness = local_ray.harness().for_module("test_e2e_webhooks")
    harness.deploy(webhook_secret=SECRET, webhook_allow_private=True,
                   webhook_retry_base_s=0.2)
    return harness


def test_a_refused_webhook_is_retried_and_verifies_with_standardwebhooks(
        harness: ServeHarness) -> None:
    with receiver(script=[503]) as rx, harness.client() as client:
        resp = client.post("/generate/text2img", json={
            "prompt": "a lake at dawn", "width": 64, "height": 64, "steps": 2, "seed": 3,
            "webhook": rx.url})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        assert wait_for(client, job_id, timeout_s=120)["status"] == "completed"
        first, second = rx.wait_for(2, timeout_s=30)
        assert (first.answered, second.answered) == (503, 200)
        assert first.error is None and second.error is None  # both verified
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        body = body_of(second)
        assert second.verified == body
        assert (body["event"], body["id"], body["status"]) == ("completed", job_id, "completed")
        assert body["result"]["images"] == [f"{harness.url}/jobs/{job_id}/images/0"]
        image = client.get(body["result"]["images"][0])
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            hook = client.get(f"/jobs/{job_id}").json()["webhook"]
            if hook["deliveries"] and hook["deliveries"][0]["status"] == "delivered":
                break
            time.sleep(0.05)
        assert hook == {"url": rx.url, "events": ["completed", "failed", "cancelled"],
                        "deliveries": [{"event": "completed", "id": first.headers["webhook-id"],
                                        "status": "delivered", "attempts": 2,
                                        "lastStatus": 200}]}
