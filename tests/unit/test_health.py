"""Health probes: `/healthz` (the process answers) and `/readyz` (the tracker and the store
answer), outside auth and every rate limit, and cheap: a probe never reaches the tracker
more than once a second per ingress replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.api.readiness import Readiness
from serve_app.errors import ServiceUnavailable, StoreUnavailable
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings
from tests.support.trackers import CountedTracker, http_client, make_tracker

pytestmark = pytest.mark.anyio
KEY = "ana-key-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tracker:
    """Stands for the tracker: answers `ready` as told, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def ready(self) -> dict[str, str]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {"tracker": "ok", "store": "ok"}


async def test_readiness_asks_once_a_second_and_shares_one_check() -> None:
    tracker, clock = Tracker(), Clock()
    readiness = Readiness(tracker, ttl_s=1.0, clock=clock)  # type: ignore[arg-type]
    tracker.gate = asyncio.Event()
    probes = [asyncio.create_task(readiness.check()) for _ in range(50)]
    await asyncio.sleep(0)
    tracker.gate.set()
    answers = await asyncio.gather(*probes)
    assert tracker.calls == 1 and all(a == {"status": "ready", "tracker": "ok",
                                            "store": "ok"} for a in answers)
    clock.now = 0.9
    await readiness.check()
    assert tracker.calls == 1
    clock.now = 1.0
    await readiness.check()
    assert tracker.calls == 2


async def test_not_ready_is_a_503_with_the_reason_and_is_asked_again_a_second_later(
        ) -> None:
    tracker, clock = Tracker(), Clock()
    readiness = Readiness(tracker, ttl_s=1.0, clock=clock)  # type: ignore[arg-type]
    tracker.fail = StoreUnavailable("The job store is unavailable; retry shortly")
    with pytest.raises(ServiceUnavailable, match="Not ready: The job store is unavailable"):
        await readiness.check()
    with pytest.raises(ServiceUnavailable):
        await readiness.check()  # the failure is reused too: still one call
    assert tracker.calls == 1
    tracker.fail = None
    clock.now = 1.5
    assert (await readiness.check())["status"] == "ready"


async def test_a_tracker_that_does_not_answer_is_not_ready_in_bounded_time() -> None:
    tracker = Tracker()
    tracker.gate = asyncio.Event()  # never set: the tracker hangs
    readiness = Readiness(tracker, timeout_s=0.05)  # type: ignore[arg-type]
    with pytest.raises(ServiceUnavailable, match="did not answer"):
        await readiness.check()


@pytest.fixture
async def keyed(registry: Registry, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    limited = load_settings(settings.model_dump(exclude={"api_keys"}) | {
        "read_rate": 1, "read_burst": 2, "submit_rate": 1, "submit_burst": 1},
        env={"API_KEYS": f"ana:{KEY}"})
    tracker = make_tracker(registry, limited)
    counted = CountedTracker(tracker)
    async with http_client(counted, limited, registry) as client:
        yield {"client": client, "counted": counted, "registry": registry,
               "settings": limited, "tracker": tracker}
    await tracker.close()


async def test_probes_need_no_key_and_pass_while_every_key_is_rate_limited(
        keyed: dict[str, Any]) -> None:
    client, counted = keyed["client"], keyed["counted"]
    as_ana = {"Authorization": f"Bearer {KEY}"}
    while (await client.get("/jobs", headers=as_ana)).status_code != 429:
        pass  # spend the key's read bucket
    assert (await client.get("/queue/status")).status_code == 401
    counted.calls.clear()
    answers = await asyncio.gather(*(client.get(path) for path in ["/healthz", "/readyz"] * 150))
    assert [a.status_code for a in answers] == [200] * 300
    assert answers[0].json() == {"status": "ok"}
    assert answers[1].json() == {"status": "ready", "tracker": "ok", "store": "ok"}
    assert counted.calls == {"ready": 1}  # 150 readiness probes, one tracker call


async def test_readyz_is_503_while_the_store_does_not_answer(
        keyed: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    client, tracker = keyed["client"], keyed["tracker"]

    async def down(call: Any) -> Any:
        raise StoreUnavailable("The job store is unavailable; retry shortly")

    monkeypatch.setattr(tracker.book.calls, "read", down)
    resp = await client.get("/readyz")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json() == {"error": "Not ready: The job store is unavailable; retry shortly"}
    assert (await client.get("/healthz")).status_code == 200  # alive all the same
