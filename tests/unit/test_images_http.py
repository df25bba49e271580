"""Images out of records, over the routes in process: input images stored before a job is
acknowledged (and deleted when it is refused), records that stay small whatever the images,
`result.images` as data URIs or URLs, and `/jobs/:id/images/:n` with ETag, Range and HEAD;
records written before images left them still read."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_app.blobs import Blobs
from serve_app.errors import ServiceUnavailable
from serve_app.jobs.codec import dumps, loads, to_row
from serve_app.jobs.job import Job, JobResult
from serve_app.jobs.persistence import InlineStoreCalls
from serve_app.jobs.service import JobTracker
from serve_app.messages import InputImage, JobType
from serve_app.registry import Registry
from serve_app.settings import Settings
from serve_app.stores.memory import MemoryStore
from tests.support.fakes import FakeReplicas, fake_image, shared_blobs
from tests.support.generation import make_task
from tests.support.trackers import SMALL, http_client, make_tracker, settle

pytestmark = pytest.mark.anyio


def noise_png(width: int, height: int) -> str:
    """A PNG that does not compress (a photo's worth of bytes), as a data URI."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Service:
    """The routes over a tracker with fake replicas, on a blob store of this test's own."""

    def __init__(self, registry: Registry, settings: Settings, name: str, **update: Any
                 ) -> None:
        url = f"memory://{name}"
        self.settings = settings.model_copy(update={"blob_url": url} | update)
        self.blobs: Blobs = shared_blobs(url)
        self.store = MemoryStore()
        self.replicas = FakeReplicas(blob_url=url)
        self.tracker: JobTracker = make_tracker(registry, self.settings, self.replicas,
                                                store=InlineStoreCalls(self.store))
        self.client = http_client(self.tracker, self.settings, registry)

    def blob_keys(self) -> list[str]:
        return [m.key for m in self.blobs.listing()]

    async def run(self, path: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
        resp = await self.client.post(path, json=body, headers=headers)
        assert resp.status_code == 202, resp.text
        await settle()
        return dict(resp.json())


@pytest.fixture
async def service(registry: Registry, settings: Settings, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Service]:
    s = Service(registry, settings, request.node.name)
    async with s.client:
        yield s
    await s.tracker.close()


async def test_input_images_are_stored_before_the_job_and_its_record_holds_keys(
        service: Service) -> None:
    init = noise_png(256, 256)
    job = await service.run("/generate/img2img", SMALL | {"initImage": init})
    key = f"jobs/{job['id']}/in/init_image.png"
    assert key in service.blob_keys()
    stored = json.loads(service.store.load(job["id"]) or "{}")
    assert stored["status"] == "completed"  # a finished job's task is dropped ...
    job2 = await service.client.post("/generate/img2img", json=SMALL | {"initImage": init})
    queued = json.loads(service.store.load(job2.json()["id"]) or "{}")
    assert queued["task"]["init_image"] == {"key": f"jobs/{job2.json()['id']}/in/init_image"
                                                   ".png", "width": 256, "height": 256}
    # ... and the replica read back the PNG the ingress stored.
    (_, task), = [(m, t) for m, t in service.replicas.calls if t.job_id == job["id"]]
    assert task.init_image is not None and task.init_image.key == key


async def test_a_record_stays_small_whatever_the_size_and_number_of_images(
        registry: Registry, settings: Settings) -> None:
    s = Service(registry, settings, "small-records",
                limits=settings.limits.model_copy(update={"max_work": 10_000}))
    async with s.client:
        job = await s.run("/generate/img2img", SMALL | {
            "initImage": noise_png(1024, 1024), "width": 1024, "height": 1024,
            "numImages": 4})
        inpaint = await s.run("/generate/inpaint", SMALL | {
            "image": noise_png(768, 768), "mask": noise_png(768, 768), "width": 768,
            "height": 768})
        for j in (job, inpaint):
            text = s.store.load(j["id"]) or ""
            assert json.loads(text)["status"] == "completed"
            assert len(text) < 8 * 1024, len(text)
        assert len((await s.client.get(f"/jobs/{job['id']}")).json()["result"]["images"]) == 4
    await s.tracker.close()


async def test_a_refused_submit_leaves_no_blob_and_a_repeat_leaves_only_the_first_jobs(
        registry: Registry, settings: Settings) -> None:
    s = Service(registry, settings, "refused", max_queue_size=1)
    s.replicas.hold = asyncio.Event()
    body = SMALL | {"initImage": noise_png(64, 64)}
    async with s.client:
        first = await s.run("/generate/img2img", body, **{"Idempotency-Key": "k1"})
        await s.run("/generate/img2img", body)  # waits: the queue is full now
        before = s.blob_keys()
        full = await s.client.post("/generate/img2img", json=body)
        assert full.status_code == 429
        again = await s.client.post("/generate/img2img", json=body,
                                    headers={"Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert s.blob_keys() == before  # neither the refused nor the repeat left its inputs
        s.replicas.hold.set()
    await s.tracker.close()


async def test_a_submit_whose_fate_is_unknown_leaves_its_inputs_to_the_sweep(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unavailable(sub: Any) -> Any:
        raise ServiceUnavailable("The job tracker is restarting; retry shortly")

    monkeypatch.setattr(service.tracker, "submit", unavailable)
    resp = await service.client.post("/generate/img2img",
                                     json=SMALL | {"initImage": noise_png(64, 64)})
    assert resp.status_code == 503
    assert len(service.blob_keys()) == 1  # it may have been saved: the sweep decides later


async def test_images_are_data_uris_by_default_and_urls_on_request(service: Service) -> None:
    job = await service.run("/generate/text2img", SMALL | {"numImages": 2})
    record = (await service.client.get(f"/jobs/{job['id']}")).json()
    task = service.replicas.calls[-1][1]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in record["result"]["images"]] == [
        fake_image(task, 7), fake_image(task, 8)]
    urls = (await service.client.get(f"/jobs/{job['id']}?images=url")).json()
    assert urls["result"]["images"] == [f"http://test/jobs/{job['id']}/images/{n}"
                                        for n in (0, 1)]
    behind = await service.client.get(f"/jobs/{job['id']}", params={"images": "url"},
                                      headers={"X-Forwarded-Proto": "https",
                                               "X-Forwarded-Host": "gen.example.com"})
    assert behind.json()["result"]["images"][0].startswith("https://gen.example.com/jobs/")
    bad = await service.client.get(f"/jobs/{job['id']}?images=inline")
    assert bad.status_code == 400 and "images" in bad.json()["error"]


async def test_an_image_is_served_with_its_etag_ranges_and_head(service: Service) -> None:
    job = await service.run("/generate/text2img", SMALL)
    data = fake_image(service.replicas.calls[-1][1], 7)
    url = f"/jobs/{job['id']}/images/0"
    whole = await service.client.get(url)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    assert (whole.status_code, whole.content) == (200, data)
    assert whole.headers["etag"] == etag and "immutable" in whole.headers["cache-control"]
    assert whole.headers["content-type"] == "image/png"
    assert (await service.client.get(url, headers={"If-None-Match": etag})).status_code == 304
    part = await service.client.get(url, headers={"Range": "bytes=2-5"})
    assert (part.status_code, part.content) == (206, data[2:6])
    assert part.headers["content-range"] == f"bytes 2-5/{len(data)}"
    tail = await service.client.get(url, headers={"Range": "bytes=-3"})
    assert tail.content == data[-3:]
    outside = await service.client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert outside.status_code == 416 and outside.headers["content-range"] == (
        f"bytes */{len(data)}")
    assert "outside the image" in outside.json()["error"]
    head = await service.client.head(url)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == etag


async def test_an_image_whose_blob_is_gone_is_404_and_the_record_says_why(
        service: Service) -> None:
    job = await service.run("/generate/text2img", SMALL)
    service.blobs.delete_job(job["id"])  # e.g. a bucket lifecycle rule
    resp = await service.client.get(f"/jobs/{job['id']}/images/0")
    assert resp.status_code == 404 and "not in the blob store" in resp.json()["error"]


async def test_a_record_written_before_images_left_records_still_reads(
        service: Service) -> None:
    """Images inline as data URIs, input images as base64 PNGs in the task: served as they
    are, and `?images=url` points at the service's own image URLs."""
    png = base64.b64decode(noise_png(8, 8).split(",", 1)[1])
    old = Job(id="job_1700000000000_oldrecord", type=JobType.IMG2IMG, model="tiny-sd",
              request={"prompt": "x"}, created_at_ms=1_700_000_000_000)
    old.start(1_700_000_000_100, "r")
    old.complete(JobResult(["data:image/png;base64," + base64.b64encode(png).decode()], [7],
                           {"prompt": "x"}, 5, "image/png"), 1_700_000_000_200)
    service.store.save_many([to_row(old)])
    record = (await service.client.get(f"/jobs/{old.id}")).json()
    assert record["status"] == "completed"
    assert base64.b64decode(record["result"]["images"][0].split(",", 1)[1]) == png
    image = await service.client.get(f"/jobs/{old.id}/images/0")
    assert (image.status_code, image.content, image.headers["content-type"]) == (
        200, png, "image/png")
    urls = (await service.client.get(f"/jobs/{old.id}?images=url")).json()
    assert urls["result"]["images"] == [f"http://test/jobs/{old.id}/images/0"]
    # An old unfinished job's task, its input image inline, still loads for a restart.
    queued = Job(id="job_1700000000000_oldqueued", type=JobType.IMG2IMG, model="tiny-sd",
                 request={}, created_at_ms=1)
    queued.task = make_task(mode=JobType.IMG2IMG, init_image=InputImage(png, 8, 8))
    again = loads(dumps(queued))
    assert again.task is not None and again.task.init_image == InputImage(png, 8, 8)


async def test_a_repeated_idempotency_key_answers_the_finished_job_with_its_images(
        service: Service) -> None:
    first = await service.run("/generate/text2img", SMALL, **{"Idempotency-Key": "again"})
    repeat = await service.client.post("/generate/text2img", json=SMALL,
                                       headers={"Idempotency-Key": "again"})
    assert repeat.status_code == 202 and repeat.json()["id"] == first["id"]
    assert repeat.json()["result"]["images"][0].startswith("data:image/png;base64,")
