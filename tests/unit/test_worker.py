"""ModelWorker: event order, one call at a time, and cancellation that frees the pipeline."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from serve_app.generation.runner import Interrupted, ModelRunner
from serve_app.generation.worker import ModelWorker
from serve_app.messages import (
    Finished,
    GenerationResult,
    GenerationTask,
    Progress,
    ReplicaEvent,
    Started,
)
from tests.support.generation import make_task, tiny_settings, tiny_spec

pytestmark = pytest.mark.anyio


class FakeRunner:
    """A runner that takes `step_s` per step, honours should_stop, and records what ran."""

    def __init__(self, step_s: float = 0.005, fail: Exception | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.steps_run: list[int] = []
        self.running = 0
        self.max_running = 0
        self.finished = threading.Event()
        self._guard = threading.Lock()

    def generate(
        self,
        task: GenerationTask,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        with self._guard:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.finished.clear()
        try:
            done = 0
            for step in range(1, task.steps + 1):
                time.sleep(self.step_s)
                done = step
                if on_step:
                    on_step(step, task.steps)
                if should_stop and should_stop():
                    raise Interrupted(f"stopped after {step}")
                if self.fail and step == 2:
                    raise self.fail
            return GenerationResult(images=[b"img"], seeds=task.seeds, content_type="image/png")
        finally:
            self.steps_run.append(done)
            with self._guard:
                self.running -= 1
            self.finished.set()


async def collect(worker: ModelWorker, task: GenerationTask) -> list[ReplicaEvent]:
    return [event async for event in worker.stream(task)]


async def test_progress_is_coalesced_to_the_first_the_last_and_one_per_interval() -> None:
    worker = ModelWorker(FakeRunner(), "tiny-sd#0", progress_every_s=10)
    events = await collect(worker, make_task(steps=30))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress == [Progress(1, 30), Progress(30, 30)]  # 30 quick steps, one interval


async def test_stream_yields_started_progress_then_finished() -> None:
    worker = ModelWorker(FakeRunner(), "tiny-sd#0", progress_every_s=0)
    events = await collect(worker, make_task(steps=3))
    assert events[0] == Started("tiny-sd#0")
    assert events[1:4] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    assert isinstance(events[4], Finished) and len(events) == 5
    assert events[4].result.replica == "tiny-sd#0"


async def test_tasks_run_one_at_a_time() -> None:
    runner = FakeRunner()
    worker = ModelWorker(runner, "r")
    results = await asyncio.gather(*(collect(worker, make_task(steps=4)) for _ in range(3)))
    assert runner.max_running == 1
    assert all(isinstance(events[-1], Finished) for events in results)


async def test_the_event_loop_stays_free_while_the_pipeline_runs() -> None:
    worker = ModelWorker(FakeRunner(step_s=0.02), "r")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick = asyncio.create_task(ticker())
    await worker.generate(make_task(steps=10))
    tick.cancel()
    assert ticks >= 10


async def test_cancelling_the_consumer_stops_the_runner_and_frees_the_worker() -> None:
    runner = FakeRunner(step_s=0.01)
    worker = ModelWorker(runner, "r")
    first_progress = asyncio.Event()

    async def consume() -> None:
        async for event in worker.stream(make_task(steps=500)):
            if isinstance(event, Progress):
                first_progress.set()

    consumer = asyncio.create_task(consume())
    await first_progress.wait()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # The lock was released only after the pipeline thread had returned.
    assert runner.finished.is_set() and runner.running == 0
    assert not worker.busy
    assert runner.steps_run[0] < 10  # stopped within a step or two, not after 500
    result = await worker.generate(make_task(steps=2))
    assert result.images == [b"img"]


async def test_closing_the_stream_early_stops_the_runner() -> None:
    runner = FakeRunner(step_s=0.01)
    worker = ModelWorker(runner, "r")
    stream = worker.stream(make_task(steps=500))
    assert isinstance(await anext(stream), Started)
    assert isinstance(await anext(stream), Progress)
    await stream.aclose()
    assert runner.running == 0 and runner.steps_run[0] < 10
    assert not worker.busy


async def test_a_runner_error_reaches_the_consumer_and_frees_the_worker() -> None:
    worker = ModelWorker(FakeRunner(fail=RuntimeError("CUDA out of memory")), "r")
    with pytest.raises(RuntimeError, match="out of memory"):
        await collect(worker, make_task(steps=5))
    assert not worker.busy


async def test_generate_returns_the_result_with_the_replica_name() -> None:
    worker = ModelWorker(FakeRunner(), "tiny-sd#3")
    result = await worker.generate(make_task(seed=11, num_images=2))
    assert result.seeds == [11, 12] and result.replica == "tiny-sd#3"


# -- with the real tiny model --------------------------------------------------------------


class CountingRunner:
    """The real runner, with a count of the steps it actually ran."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.steps = 0

    def generate(
        self,
        task: GenerationTask,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        def counted(step: int, total: int) -> None:
            self.steps = step
            if on_step:
                on_step(step, total)

        return self.runner.generate(task, counted, should_stop)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    return ModelRunner(tiny_spec(), tiny_settings(tmp_path_factory))


async def test_real_pipeline_streams_then_stops_within_a_step_when_cancelled(
    runner: ModelRunner,
) -> None:
    counting = CountingRunner(runner)
    worker = ModelWorker(counting, "tiny-sd#0", progress_every_s=0)
    events = await collect(worker, make_task(steps=3, sampler="euler"))
    assert [type(e) for e in events] == [Started, Progress, Progress, Progress, Finished]

    first_progress = asyncio.Event()

    async def consume() -> None:
        async for event in worker.stream(make_task(steps=200, sampler="euler")):
            if isinstance(event, Progress):
                first_progress.set()

    consumer = asyncio.create_task(consume())
    await first_progress.wait()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert not worker.busy
    assert 1 <= counting.steps <= 3  # stopped at the next step boundary, not after 200
    again = await worker.generate(make_task(steps=3, sampler="euler"))
    assert [again] == [
        dataclasses.replace(e.result, time_taken_ms=again.time_taken_ms)
        for e in events
        if isinstance(e, Finished)
    ]


async def test_a_step_with_thumbnails_is_never_coalesced_away(runner: ModelRunner) -> None:
    worker = ModelWorker(runner, "tiny-sd#0", progress_every_s=10)
    events = await collect(worker, make_task(steps=6, sampler="euler", preview_every=2))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(p.step, sorted(p.previews)) for p in progress] == [
        (1, []), (2, ["job-1"]), (4, ["job-1"]), (6, [])]
    assert all(p.previews["job-1"][:2] == b"\xff\xd8" for p in progress[1:3])  # JPEG


async def test_a_batchs_results_travel_as_one_stream_item_and_unpack_in_order() -> None:
    from serve_app.messages import pack, unpack

    done = [Finished(GenerationResult([b"i"], [s], "image/png", job_id=f"job-{s}"))
            for s in range(3)]

    async def events(*seq: ReplicaEvent) -> AsyncIterator[ReplicaEvent]:
        for event in seq:
            yield event

    batch = [Started("r"), Progress(1, 2), Progress(2, 2), *done]
    items = [item async for item in pack(events(*batch))]
    assert items == [Started("r"), Progress(1, 2), Progress(2, 2), done]  # 4 items, not 6
    assert [e for item in items for e in unpack(item)] == batch
    # Results never overtake an event between them.
    mixed = [Progress(1, 2), done[0], Progress(2, 2), done[1]]
    items = [item async for item in pack(events(*mixed))]
    assert items == [Progress(1, 2), [done[0]], Progress(2, 2), [done[1]]]


class EchoRunner(FakeRunner):
    """Makes, as its image, the bytes of the task's init image (what it was given)."""

    def generate(self, task: GenerationTask, on_step: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        assert task.init_image is not None
        return GenerationResult(images=[task.init_image.png, b"second"], seeds=task.seeds,
                                content_type="image/webp")


async def test_with_a_blob_store_inputs_are_read_by_key_and_results_leave_as_references(
        ) -> None:
    """No image bytes leave a replica: the worker reads the task's input images from the
    blob store by their keys, and writes its results there, sending references."""
    import hashlib

    from obstore.store import MemoryStore

    from serve_app.blobs import Blobs
    from serve_app.messages import InputImage, JobType

    blobs = Blobs(MemoryStore())
    blobs.put("jobs/job_7_a/in/init_image.png", b"the input", "image/png")
    worker = ModelWorker(EchoRunner(), "r#1", blobs=blobs)
    task = make_task(job_id="job_7_a", mode=JobType.IMG2IMG, width=32, height=16,
                     init_image=InputImage(b"", 32, 16, key="jobs/job_7_a/in/init_image.png"))
    (*_, done) = [e async for e in worker.stream(task)]
    assert isinstance(done, Finished) and done.result.images == []
    first, second = done.result.refs
    assert (first.key, first.content_type, first.size, first.width, first.height) == (
        "jobs/job_7_a/out/0.webp", "image/webp", 9, 32, 16)
    assert first.sha256 == hashlib.sha256(b"the input").hexdigest()
    assert blobs.get(first.key) == b"the input" and blobs.get(second.key) == b"second"


class TwoPassRunner(FakeRunner):
    """Reports like a hires fix: two first-pass steps, then three named "hires"."""

    def generate(self, task: GenerationTask, on_step: Callable[..., None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        assert on_step is not None
        for step in (1, 2):
            on_step(step, 5)
        for step in (3, 4, 5):
            on_step(step, 5, "hires")
        return GenerationResult(images=[b"img"], seeds=task.seeds, content_type="image/png")


async def test_the_first_step_of_a_second_pass_is_never_coalesced_away() -> None:
    worker = ModelWorker(TwoPassRunner(), "r", progress_every_s=10)
    events = await collect(worker, make_task())
    assert [e for e in events if isinstance(e, Progress)] == [
        Progress(1, 5), Progress(3, 5, phase="hires"), Progress(5, 5, phase="hires")]


async def test_a_hires_results_images_are_stored_at_the_hires_size() -> None:
    from obstore.store import MemoryStore

    from serve_app.blobs import Blobs
    from serve_app.messages import HiresFix

    worker = ModelWorker(FakeRunner(), "r", blobs=Blobs(MemoryStore()))
    task = make_task(job_id="job_8_b", width=64, height=48, steps=1,
                     hires=HiresFix(128, 96, "latent", 2, 0.5, "euler_a"))
    (*_, done) = [e async for e in worker.stream(task)]
    assert isinstance(done, Finished)
    assert [(r.width, r.height) for r in done.result.refs] == [(128, 96)]
