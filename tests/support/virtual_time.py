"""An asyncio event loop whose clock jumps instead of waiting.

When the loop has nothing ready and would sleep until its next timer, the clock moves to that
timer at once. Timeouts, `call_later` and `asyncio.sleep` then cost no real time, and a test
can drive hours of timer-based behaviour (JOB_TIMEOUT, batch holds) in milliseconds and in a
fixed order. The clock starts far from zero, as a real monotonic clock does, so code that
confuses a delay with a deadline is caught.

Only for code that does no real I/O or threads: a loop that jumps the clock while a thread
works would fire timers that real time would not have reached.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

START = 1_000_000.0


class _JumpingSelector:
    """Wraps the loop's selector: a wait for `timeout` seconds moves the clock instead."""

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._selector = selector
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is not None and timeout > 0:
            self._loop.now += timeout
            timeout = 0
        return self._selector.select(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = START) -> None:
        super().__init__()
        self.now = start
        self._selector = _JumpingSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


# An async test (anyio's plugin) on a virtual-time loop: its sleeps and the code's timers
# fire in deadline order, exactly, however loaded the machine is.
VIRTUAL_TIME = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"loop_factory": VirtualTimeLoop}),
                                   id="virtual-time")])
