"""imagegen.client against the real HTTP API on 127.0.0.1 (tracker in process, fake replica)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imagegen.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    Job,
    JobCancelled,
    JobStatus,
    NotFound,
    RateLimited,
    Unauthorized,
    WaitTimeout,
)
from serve_app.cli import free_port
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.client_server import LiveServer, live_server


@pytest.fixture
def server(registry: Registry, settings: Settings) -> Iterator[LiveServer]:
    with live_server(registry, settings) as live:
        yield live


@pytest.fixture
def held(registry: Registry, settings: Settings) -> Iterator[LiveServer]:
    """Jobs park after their first step until `held.release()`."""
    with live_server(registry, settings, hold=True, max_queue_size=2) as live:
        yield live
        live.release()


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.url, timeout=10) as c:
        yield c


def png_bytes(size: tuple[int, int], color: str = "blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def wait_until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_text2img_then_wait_returns_the_images_as_bytes_and_pil(client: Client) -> None:
    job = client.text2img("a lake at dawn", width=96, height=64, steps=3, seed=7, num_images=2)
    assert (job.status, job.type, job.request["prompt"]) == ("queued", "text2img", "a lake at dawn")
    done = client.wait(job, timeout=10)
    assert done.status is JobStatus.COMPLETED and done.progress == 100
    assert done.result is not None and done.result.seeds == [7, 8]
    first = done.image_bytes(0)
    assert first.startswith(b"\x89PNG") and done.image(1).size == (96, 64)
    assert client.image_bytes(job.id, 0) == first  # the raw-bytes route serves the same image
    assert client.image(job, 1).tobytes() == done.image(1).tobytes() != done.image(0).tobytes()
    assert done.completed_at is not None and done.created_at <= done.completed_at


def test_wait_reports_progress_through_the_callback(held: LiveServer) -> None:
    seen: list[Job] = []
    with Client(held.url) as client:
        job = client.text2img("x", width=64, height=64, steps=4)
        waiter = threading.Thread(target=lambda: seen.append(
            client.wait(job, timeout=10, on_progress=seen.append)))
        waiter.start()
        wait_until(lambda: any(j.status == "processing" for j in seen))
        held.release()
        waiter.join(10)
    *events, final = seen
    assert events[-1].status == "completed" and final.result is not None
    progress = [j.progress for j in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert any(j.status == "processing" and 0 < j.progress < 100 for j in events)
    assert all(j.result is None or not j.result.images for j in events)  # events carry no images


def test_stream_yields_records_until_the_job_ends(client: Client) -> None:
    job = client.text2img("x", width=64, height=64, steps=2)
    records = list(client.stream(job.id, timeout=10))
    assert records[-1].status is JobStatus.COMPLETED and records[-1].done
    assert all(r.id == job.id and not r.done for r in records[:-1])


def test_stream_and_wait_time_out_while_the_job_runs(held: LiveServer) -> None:
    with Client(held.url) as client:
        job = client.text2img("x", width=64, height=64, steps=3)
        began = time.monotonic()
        with pytest.raises(WaitTimeout) as exc:
            list(client.stream(job, timeout=0.5))
        assert 0.4 < time.monotonic() - began < 3
        with pytest.raises(TimeoutError):  # WaitTimeout is a TimeoutError too
            client.wait(job, timeout=0.3)
    assert exc.value.job_id == job.id and "not finished after 0.5 s" in str(exc.value)


def test_wait_polls_when_the_event_stream_is_not_passed(registry, settings) -> None:
    with live_server(registry, settings, events=False) as live, Client(live.url) as client:
        seen: list[Job] = []
        done = client.wait(client.text2img("x", width=64, height=64, steps=2), timeout=10,
                           on_progress=seen.append)
    assert done.status == "completed" and seen[-1].status == "completed"


def test_cancel_a_running_job_then_wait_raises_job_cancelled(held: LiveServer) -> None:
    with Client(held.url) as client:
        job = client.text2img("x", width=64, height=64, steps=3)
        wait_until(lambda: client.get(job).status == "processing")
        result = client.cancel(job)
        assert (result.success, result.id, result.status) == (True, job.id, "cancelled")
        with pytest.raises(JobCancelled) as exc:
            client.wait(job, timeout=5)
        assert exc.value.job.status == "cancelled"
        assert client.wait(job, raise_on_failure=False).status == "cancelled"
        again = client.cancel(job)  # a retried cancel answers the same
        assert (again.success, again.status) == (True, "cancelled")
        done = client.text2img("y", width=64, height=64, steps=1)
        held.release()
        client.wait(done, timeout=5)
        with pytest.raises(Conflict) as conflict:
            client.cancel(done)
    assert conflict.value.status == 409 and "cancel" in conflict.value.message.lower()


def test_errors_are_typed_and_carry_the_services_message(client: Client) -> None:
    with pytest.raises(BadRequest) as bad:
        client.text2img("x", width=500)
    assert bad.value.status == 400 and "width must be a multiple of 8" in bad.value.message
    with pytest.raises(BadRequest, match="Unknown model 'nope'"):
        client.text2img("x", model="nope")
    with pytest.raises(NotFound) as missing:
        client.get("job_0_nope")
    assert (missing.value.status, missing.value.message) == (404, "Job not found")
    with pytest.raises(NotFound):
        client.image_bytes("job_0_nope")
    with pytest.raises(NotFound):
        list(client.stream("job_0_nope"))
    with pytest.raises(NotFound):
        client.wait("job_0_nope", timeout=5)


def test_a_full_queue_is_rate_limited_with_retry_after(held: LiveServer) -> None:
    with Client(held.url) as client, pytest.raises(RateLimited) as exc:
        for _ in range(10):
            client.text2img("x", width=64, height=64, steps=2)
    assert exc.value.status == 429 and exc.value.retry_after is not None


def test_api_key_goes_as_a_bearer_token_and_401_is_typed(registry, settings) -> None:
    with live_server(registry, settings, api_key="s3cret-0123456789abcdef") as live:
        with Client(live.url, api_key="s3cret-0123456789abcdef") as client:
            assert client.queue_status().queued_jobs == 0
        with Client(live.url, api_key="wrong") as client, pytest.raises(Unauthorized) as exc:
            client.models()
    assert (exc.value.status, exc.value.message) == (
        401, "The API key is not valid; check it, or ask for a new one")


def test_unreachable_service_is_connection_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client, pytest.raises(ConnectionFailed) as exc:
        client.queue_status()
    assert str(exc.value).startswith(f"cannot reach {url}")


def test_jobs_are_listed_newest_first_page_by_page(client: Client) -> None:
    ids = [client.text2img(f"p{i}", width=64, height=64, steps=1).id for i in range(5)]
    for job_id in ids:
        client.wait(job_id, timeout=10)
    first = client.jobs(limit=2)
    assert len(first.jobs) == 2 and first.next_cursor
    second = client.jobs(limit=2, cursor=first.next_cursor)
    assert {j.id for j in first.jobs}.isdisjoint(j.id for j in second.jobs)
    every = [j.id for j in client.iter_jobs(page_size=2)]
    assert sorted(every) == sorted(ids) and every[:2] == [j.id for j in first.jobs]
    assert [j.id for j in client.iter_jobs(status="failed")] == []
    with pytest.raises(BadRequest, match="status must be one of"):
        client.jobs(status="done")


def test_models_and_queue_status_are_typed(client: Client) -> None:
    client.wait(client.text2img("x", width=64, height=64, steps=1), timeout=10)
    models = {m.id: m for m in client.models()}
    assert models["tiny-sd"].served and models["tiny-sd"].default
    assert not models["sdxl"].served
    queue = client.queue_status()
    assert (queue.completed_jobs, queue.queued_jobs, queue.failed_jobs) == (1, 0, 0)


def test_input_images_go_as_data_uris_from_paths_bytes_and_pil(client: Client,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes((96, 80)))
    job = client.img2img(path, "watercolor", strength=0.5, steps=2)
    assert job.request["initImage"]["width"] == 96 and job.request["strength"] == 0.5
    mask = Image.new("L", (96, 80), 255)
    job = client.inpaint(png_bytes((96, 80)), mask, "a boat", strength=0.8, steps=2)
    assert job.request["inpaintingStrength"] == 0.8
    job = client.style_transfer(str(path), png_bytes((64, 64), "red"), style_strength=0.4,
                                steps=2)
    assert job.type == "style-transfer" and job.request["styleImage"]["width"] == 64
    assert client.wait(job, timeout=10).image().size == (96, 80)


def test_async_client_submits_waits_and_streams(server: LiveServer) -> None:
    async def scenario() -> tuple[Job, list[Job], list[Job]]:
        async with AsyncClient(server.url) as client:
            seen: list[Job] = []
            job = await client.text2img("x", width=64, height=72, steps=2, seed=3)
            done = await client.wait(job, timeout=10, on_progress=seen.append)
            assert (await client.image(job)).size == (64, 72)
            streamed = [j async for j in client.stream(
                await client.text2img("y", width=64, height=64, steps=1), timeout=10)]
            with pytest.raises(NotFound):
                await client.get("job_0_nope")
            page = await client.jobs(limit=1)
            assert len(page.jobs) == 1 and len([j async for j in client.iter_jobs()]) == 2
            return done, seen, streamed

    done, seen, streamed = asyncio.run(scenario())
    assert done.result is not None and done.result.seeds == [3] and seen[-1].done
    assert streamed[-1].status == "completed"


def test_a_record_shows_its_preview_while_running_and_its_nsfw_flags_when_done() -> None:
    from imagegen.results import Job

    running = Job.from_wire({"id": "j", "type": "text2img", "status": "processing",
                             "preview": {"step": 3, "image": "data:image/jpeg;base64,AA=="}})
    assert running.preview == "data:image/jpeg;base64,AA==" and running.result is None
    done = Job.from_wire({"id": "j", "type": "text2img", "status": "completed", "result": {
        "images": ["data:image/png;base64,AA=="], "seeds": [1], "nsfw": [False]}})
    assert done.preview is None and done.result is not None and done.result.nsfw == [False]
