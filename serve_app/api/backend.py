"""What the routes speak to: anything that answers the tracker's interface.

The interface is declared once, by `JobTracker`'s `@tracker_call` methods
(`serve_app.jobs.interface`). Behind the routes is one of: the tracker itself, in process
(unit tests, benchmarks); `TrackerClient`, one tracker deployment over a Ray handle;
`Trackers`, the tracker shards, each call sent to the shard its route names; or
`DirectReads`, which answers job reads from the store and sends the rest on to `Trackers`.
Each has every call with `JobTracker`'s signature (`tests/unit/test_interface.py`), so
`JobTracker` is the type the routes are written against.
"""

from __future__ import annotations

from typing import TypeAlias

from serve_app.jobs.service import JobTracker

JobsBackend: TypeAlias = JobTracker
