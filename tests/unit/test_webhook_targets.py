"""Webhook targets: which addresses a webhook may go to, and the submit's webhook fields."""

from __future__ import annotations

import ipaddress
from typing import get_args

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from serve_app.api.submission import build_submission
from serve_app.api.webhook_fields import public_base_url
from serve_app.api.wire import WebhookEventName
from serve_app.errors import ConfigError, InvalidRequest
from serve_app.messages import JobType, WebhookEvent
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings, webhook_key
from serve_app.webhook_targets import blocked_reason, check_url
from tests.support.trackers import SERVED
from tests.support.webhook_receiver import SECRET

BODY = {"prompt": "a lake", "width": 64, "height": 64, "steps": 2}


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.9", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "metadata"),
    ("169.254.3.4", "link-local"),
    ("fe80::1", "link-local"),
    ("fd12:3456::1", "private"),  # IPv6 unique local
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("100.64.0.1", "not a public"),  # carrier-grade NAT
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("2002:a9fe:a9fe::", "metadata"),  # 6to4 of 169.254.169.254
])
def test_non_public_addresses_are_refused_with_their_kind(address: str, reason: str) -> None:
    found = blocked_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://example.com/x", "http or https"),
    ("file:///etc/passwd", "http or https"),
    ("example.com/hooks", "http or https"),
    ("https:///hooks", "must name a host"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://127.0.0.1:8080/hooks", "loopback"),
    ("http://[::1]/hooks", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://10.0.0.5/", "private"),
    ("http://[fd00::5]/", "private"),
    ("https://example.com/" + "a" * 2100, "too long"),
])
def test_bad_targets_are_named(url: str, problem: str) -> None:
    found = check_url(url, allow_private=False)
    assert found is not None and problem in found


def test_private_literals_pass_when_allowed_and_names_wait_for_delivery() -> None:
    assert check_url("http://127.0.0.1:8080/hooks", allow_private=True) is None
    assert check_url("http://[fd00::5]/x", allow_private=True) is None
    # A name is resolved and checked at each delivery, not at submit.
    assert check_url("https://hooks.example.com/imagegen", allow_private=False) is None
    assert check_url("http://localhost/x", allow_private=True) is None
    assert "http or https" in (check_url("gopher://127.0.0.1/", allow_private=True) or "")


# -- settings ------------------------------------------------------------------------------


def test_the_secret_is_checked_named_and_never_shown() -> None:
    settings = load_settings(env={"WEBHOOK_SECRET": SECRET,
                                  "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE": "1",
                                  "IMAGEGEN_WEBHOOK_DEADLINE_S": "600"})
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET
    assert settings.webhook_allow_private and settings.webhook_deadline_s == 600
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    for bad, why in (("sekrit", "start with whsec_"), ("whsec_!!notbase64!!", "not valid base64"),
                     ("whsec_", "is empty")):
        with pytest.raises(ConfigError, match=why) as info:
            load_settings(env={"WEBHOOK_SECRET": bad})
        assert "(environment variable WEBHOOK_SECRET)" in str(info.value)
        assert bad == "whsec_" or bad not in str(info.value)
    # Unpadded base64 is the same key, as the reference library reads it.
    unpadded = load_settings(env={"WEBHOOK_SECRET": SECRET.rstrip("=")}).webhook_secret
    assert SECRET.endswith("=") and unpadded is not None
    assert webhook_key(unpadded) == webhook_key(SecretStr(SECRET))


# -- the submit's fields -------------------------------------------------------------------


def submit(registry: Registry, settings: Settings, **fields: object):  # type: ignore[no-untyped-def]
    return build_submission(JobType.TEXT2IMG, BODY | fields, settings=settings,
                            registry=registry, served=SERVED, base_url="http://gen.test")


def with_secret(settings: Settings, **more: object) -> Settings:
    return settings.model_copy(update={"webhook_secret": SecretStr(SECRET)} | more)


def test_a_webhook_without_a_secret_on_the_server_is_a_400_saying_how(registry, settings) -> None:
    with pytest.raises(InvalidRequest, match="WEBHOOK_SECRET=whsec_") as info:
        submit(registry, settings, webhook="https://example.com/h")
    assert info.value.message.startswith("webhook")


def test_webhook_fields_become_the_submissions_webhook(registry, settings) -> None:
    sub = submit(registry, with_secret(settings), webhook="https://example.com/h")
    assert sub.webhook is not None and sub.webhook.url == "https://example.com/h"
    assert sub.webhook.events == (WebhookEvent.COMPLETED, WebhookEvent.FAILED,
                                  WebhookEvent.CANCELLED)
    assert sub.webhook.base_url == "http://gen.test"
    assert "webhook" not in sub.request and "webhookEvents" not in sub.request
    chosen = submit(registry, with_secret(settings), webhook="https://example.com/h",
                    webhookEvents=["started", "completed", "started"])
    assert chosen.webhook is not None
    assert chosen.webhook.events == (WebhookEvent.STARTED, WebhookEvent.COMPLETED)
    assert submit(registry, settings).webhook is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"webhook": "http://127.0.0.1:9/h"}, "webhook points at 127.0.0.1, a loopback address"),
    ({"webhook": "http://169.254.169.254/"}, "cloud metadata"),
    ({"webhook": "ftp://example.com/"}, "webhook must be an http or https URL"),
    ({"webhook": 5}, "webhook must be a string"),
    ({"webhook": "https://example.com/", "webhookEvents": ["finished"]}, "webhookEvents"),
    ({"webhook": "https://example.com/", "webhookEvents": []}, "at least one of"),
    ({"webhookEvents": ["completed"]}, "webhookEvents needs webhook"),
])
def test_bad_webhook_fields_are_400s_naming_the_field(registry, settings, fields,
                                                      message) -> None:
    with pytest.raises(InvalidRequest, match=message):
        submit(registry, with_secret(settings), **fields)


def test_private_targets_pass_when_the_server_allows_them(registry, settings) -> None:
    sub = submit(registry, with_secret(settings, webhook_allow_private=True),
                 webhook="http://127.0.0.1:9/h")
    assert sub.webhook is not None and sub.webhook.url == "http://127.0.0.1:9/h"


def request_to(headers: dict[str, str], scheme: str = "http") -> Request:
    return Request({"type": "http", "method": "POST", "scheme": scheme, "path": "/x",
                    "root_path": "", "query_string": b"", "server": ("127.0.0.1", 3003),
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


def test_image_links_use_the_url_the_client_reached() -> None:
    assert public_base_url(request_to({"host": "127.0.0.1:3003"})) == "http://127.0.0.1:3003"
    behind_proxy = {"host": "10.0.0.5:3003", "x-forwarded-proto": "https",
                    "x-forwarded-host": "gen.example.com, 10.0.0.1"}
    assert public_base_url(request_to(behind_proxy)) == "https://gen.example.com"
    assert public_base_url(request_to({"host": "h:1", "x-forwarded-proto": "https"})
                           ) == "https://h:1"
    odd = {"host": "h:1", "x-forwarded-proto": "gopher", "x-forwarded-host": "a/b@c"}
    assert public_base_url(request_to(odd)) == "http://h:1"


def test_the_wire_names_the_same_events_as_the_tracker() -> None:
    assert list(get_args(WebhookEventName)) == [e.value for e in WebhookEvent]
