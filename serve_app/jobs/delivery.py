"""Sending one webhook: Standard Webhooks signing, the retry schedule, and the HTTP POST.

Signing follows the Standard Webhooks specification: the `webhook-signature` header is
`v1,` + base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")), where the key
is the base64 after `whsec_` in WEBHOOK_SECRET. It is ten lines of `hmac`, done here rather
than with the `standardwebhooks` package, which would bring its generated API client into
the tracker for them; the tests verify every signature with that package.

`HttpSender` resolves the target's name, refuses it if any address it resolves to is not a
public one (`serve_app.webhook_targets`; unless private targets are allowed), and connects
to the address it checked, with the original Host header and TLS server name, so a second
lookup cannot answer otherwise (DNS rebinding). It follows no redirects, ignores proxy
environment variables, reads no response body, and is bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import socket
from typing import Protocol

import httpx

from serve_app.webhook_targets import IPAddress, blocked_reason, literal_address

USER_AGENT = "imagegen-webhooks/1"


class DeliveryFailed(Exception):
    """An attempt that got no HTTP status: the reason, for the job record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The `webhook-signature` header value (Standard Webhooks, version 1)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp_s}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(key, msg_id, timestamp_s, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def backoff_s(attempts: int, rng: random.Random, *, base_s: float, max_s: float) -> float:
    """The wait after the `attempts`-th failed attempt: base·2^(attempts-1), capped at
    `max_s`, with "equal jitter" (uniform in its upper half), so receivers that failed
    together are not retried together, and no wait is shorter than half its step."""
    step = min(max_s, base_s * 2.0 ** min(max(attempts - 1, 0), 62))
    return step / 2 + rng.random() * step / 2


class Sender(Protocol):
    """Makes one attempt: the response's status, or `DeliveryFailed` without one."""

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> int: ...
    async def aclose(self) -> None: ...


class HttpSender:
    def __init__(self, *, timeout_s: float, allow_private: bool) -> None:
        self._timeout_s = timeout_s
        self._allow_private = allow_private
        self._client: httpx.AsyncClient | None = None  # made at the first attempt

    def _http(self) -> httpx.AsyncClient:
        # No kept-alive connections: the pool is keyed by address, and a TLS connection
        # checked for one host name must not carry another host's webhook.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout_s), follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=0))
        return self._client

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> int:
        target = httpx.URL(url)
        host = target.host
        addresses = await self._resolve(host, target.port or _DEFAULT_PORTS[target.scheme])
        extensions = {} if literal_address(host) else {"sni_hostname": host}
        headers = headers | {"host": target.netloc.decode("ascii")}
        try:
            async with asyncio.timeout(self._timeout_s):
                for i, address in enumerate(addresses):  # the next one if one is unreachable
                    pinned = target.copy_with(host=str(address))
                    try:
                        async with self._http().stream(
                                "POST", pinned, content=body, headers=headers,
                                extensions=extensions) as response:
                            return response.status_code
                    except httpx.ConnectError:
                        if i == len(addresses) - 1:
                            raise
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self._timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}"[:300]) from None
        raise DeliveryFailed(f"{host}: no address to connect to")  # unreachable: _resolve

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses to connect to; every address of the name must be allowed."""
        literal = literal_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout_s):
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError) as exc:
                raise DeliveryFailed(f"cannot resolve {host}: {exc}"[:300]) from None
            addresses = [literal_address(str(info[4][0])) for info in infos]
        found = list(dict.fromkeys(a for a in addresses if a is not None))
        if not found:
            raise DeliveryFailed(f"{host} resolves to no address")
        if not self._allow_private:
            for address in found:
                reason = blocked_reason(address)
                if reason is not None:
                    raise DeliveryFailed(
                        f"{host} resolves to {address}, {reason}: refused (only public "
                        "addresses unless IMAGEGEN_WEBHOOK_ALLOW_PRIVATE=1)")
        return found

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_DEFAULT_PORTS = {"http": 80, "https": 443}
