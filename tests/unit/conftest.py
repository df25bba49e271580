"""The unit tier: everything in process (no Ray, no browser)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from serve_app.jobs.service import JobTracker
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.trackers import make_tracker


@pytest.fixture
async def new_tracker(registry: Registry, settings: Settings
                      ) -> AsyncIterator[Callable[..., JobTracker]]:
    """`make_tracker` with this test's registry and settings (`registry=`, `settings=`
    override them);
    every tracker made is closed after the test."""
    made: list[JobTracker] = []

    def make(replicas: Any = None, **kwargs: Any) -> JobTracker:
        tracker = make_tracker(kwargs.pop("registry", registry),
                               kwargs.pop("settings", settings), replicas, **kwargs)
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        await tracker.close()
