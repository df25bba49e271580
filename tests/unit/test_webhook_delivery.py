"""One webhook attempt: Standard Webhooks signatures (verified with the `standardwebhooks`
package), the retry schedule, and the HTTP sender against a real receiver on loopback."""

from __future__ import annotations

import random
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from serve_app.jobs.delivery import DeliveryFailed, HttpSender, backoff_s, signed_headers
from serve_app.settings import webhook_key
from tests.support.webhook_receiver import SECRET, new_secret, receiver

pytestmark = pytest.mark.anyio


def key_of(secret: str) -> bytes:
    from pydantic import SecretStr

    return webhook_key(SecretStr(secret))


def test_signed_headers_verify_with_the_standardwebhooks_package() -> None:
    for secret in (SECRET, new_secret()):
        body = b'{"event":"completed","id":"job_1_abc","progress":100}'
        headers = signed_headers(key_of(secret), "msg_1_abc_completed", int(time.time()), body)
        assert Webhook(secret).verify(body, headers)["id"] == "job_1_abc"
        assert headers["webhook-id"] == "msg_1_abc_completed"


def test_a_changed_body_id_or_secret_does_not_verify() -> None:
    body = b'{"a":1}'
    headers = signed_headers(key_of(SECRET), "msg_x", int(time.time()), body)
    for data, hdrs, secret in ((b'{"a":2}', headers, SECRET),
                               (body, headers | {"webhook-id": "msg_y"}, SECRET),
                               (body, headers, new_secret())):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(data, hdrs)


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(7)
    for attempts in range(1, 40):
        step = min(60.0, 0.5 * 2 ** (attempts - 1))
        waits = [backoff_s(attempts, rng, base_s=0.5, max_s=60.0) for _ in range(50)]
        assert all(step / 2 <= w <= step for w in waits), attempts
        assert len(set(waits)) > 1  # jittered
    assert backoff_s(10_000, rng, base_s=1, max_s=30) <= 30  # no overflow


async def test_the_sender_posts_to_a_real_receiver_and_returns_its_status() -> None:
    sender = HttpSender(timeout_s=5, allow_private=True)
    try:
        with receiver(script=[503]) as rx:
            body = b'{"event":"completed"}'
            headers = signed_headers(key_of(SECRET), "msg_1", int(time.time()), body)
            assert await sender.send(rx.url, headers, body) == 503
            assert await sender.send(rx.url, headers, body) == 200
            got = rx.wait_for(2)
            assert [r.answered for r in got] == [503, 200]
            assert all(r.error is None and r.verified == {"event": "completed"} for r in got)
            assert got[0].headers["webhook-id"] == "msg_1"
            assert got[0].headers["host"] == rx.url.split("/")[2]
    finally:
        await sender.aclose()


async def test_a_name_is_resolved_checked_and_connected_to_by_address() -> None:
    with receiver() as rx:
        by_name = rx.url.replace("127.0.0.1", "localhost")
        refusing = HttpSender(timeout_s=5, allow_private=False)
        with pytest.raises(DeliveryFailed, match=r"localhost resolves to .*loopback"):
            await refusing.send(by_name, {}, b"{}")
        await refusing.aclose()
        assert rx.received == []  # refused before anything was sent
        allowing = HttpSender(timeout_s=5, allow_private=True)
        try:
            body = b"{}"
            headers = signed_headers(key_of(SECRET), "msg_2", int(time.time()), body)
            assert await allowing.send(by_name, headers, body) == 200
        finally:
            await allowing.aclose()
        (got,) = rx.wait_for(1)
        assert got.headers["host"] == by_name.split("/")[2]  # the name, not the address


async def test_an_unreachable_or_unknown_target_fails_with_a_reason() -> None:
    sender = HttpSender(timeout_s=2, allow_private=True)
    try:
        with receiver() as rx:
            closed = rx.url
        with pytest.raises(DeliveryFailed, match="ConnectError"):
            await sender.send(closed, {}, b"{}")
        with pytest.raises(DeliveryFailed, match="cannot resolve"):
            await sender.send("http://no-such-host.invalid/h", {}, b"{}")
    finally:
        await sender.aclose()
