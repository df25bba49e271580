"""Coalescer: concurrent calls become one batch call per round trip, outcomes per item."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from serve_app.api.coalescing import Coalescer

pytestmark = pytest.mark.anyio


class Remote:
    """A batch method that answers when released, recording every batch it got."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_call_goes_at_once_and_the_rest_wait_for_the_next_round_trip() -> None:
    remote = Remote()
    coalescer: Coalescer[int, int] = Coalescer(remote, max_in_flight=1)
    first = asyncio.create_task(coalescer(0))
    await settle()
    assert remote.batches == [[0]]  # no timer: alone, it left immediately
    rest = [asyncio.create_task(coalescer(i)) for i in (2, 4, 6)]
    await settle()
    assert remote.batches == [[0]] and coalescer.in_flight == 1
    remote.release.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [20, 40, 60]
    assert remote.batches == [[0], [2, 4, 6]]


async def test_each_caller_gets_its_own_error_and_the_others_their_results() -> None:
    remote = Remote()
    remote.release.set()
    coalescer: Coalescer[int, int] = Coalescer(remote, max_in_flight=1)
    outcomes = await asyncio.gather(*(coalescer(i) for i in range(4)), return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[2] == 20
    assert [str(o) for o in outcomes[1::2]] == ["odd 1", "odd 3"]


async def test_batches_are_capped_and_calls_in_flight_bounded() -> None:
    remote = Remote()
    coalescer: Coalescer[int, int] = Coalescer(remote, max_bundle=3, max_in_flight=2)
    tasks = [asyncio.create_task(coalescer(2 * i)) for i in range(10)]
    await settle()
    assert remote.batches == [[0], [2]]  # two out; the other eight wait
    remote.release.set()
    assert await asyncio.gather(*tasks) == [20 * i for i in range(10)]
    assert [len(b) for b in remote.batches] == [1, 1, 3, 3, 2]


async def test_a_failed_call_fails_every_caller_of_that_batch_only() -> None:
    calls = 0

    async def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 2:
            raise ConnectionError("tracker gone")
        return items

    coalescer: Coalescer[int, int] = Coalescer(flaky, max_in_flight=1)
    tasks = [asyncio.create_task(coalescer(i)) for i in range(3)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[0] == 0
    assert all(isinstance(o, ConnectionError) for o in outcomes[1:])
    assert await coalescer(7) == 7  # and it keeps working


async def test_a_call_answering_the_wrong_number_of_outcomes_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    coalescer: Coalescer[int, int] = Coalescer(short)
    with pytest.raises(RuntimeError, match="1 items"):
        await coalescer(1)


async def test_a_caller_that_went_away_is_not_sent_and_old_items_expire(monkeypatch) -> None:
    remote = Remote()
    coalescer: Coalescer[int, int] = Coalescer(remote, max_in_flight=1, max_wait_s=5,
                                               expired=lambda: TimeoutError("waited"))
    first = asyncio.create_task(coalescer(0))
    await settle()
    gone = asyncio.create_task(coalescer(2))
    old = asyncio.create_task(coalescer(4))
    await settle()
    gone.cancel()
    # `old` has waited past max_wait_s by the time the first call comes back.
    monkeypatch.setattr("serve_app.api.coalescing.time.monotonic", lambda: 1e12)
    fresh = asyncio.create_task(coalescer(6))
    remote.release.set()
    assert await first == 0 and await fresh == 60
    with pytest.raises(TimeoutError, match="waited"):
        await old
    assert remote.batches == [[0], [6]]  # neither the gone nor the expired item was sent


async def test_the_bundle_call_does_not_run_in_the_context_of_the_caller_that_flushed() -> None:
    import contextvars

    request = contextvars.ContextVar("request", default="none")
    seen: list[str] = []

    async def call(items: list[int]) -> list[int]:
        seen.append(request.get())
        return items

    coalescer: Coalescer[int, int] = Coalescer(call)
    request.set("client-1")
    assert await coalescer(1) == 1
    assert seen == ["none"]
