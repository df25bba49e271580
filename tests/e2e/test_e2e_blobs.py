"""Images in a real S3 store (SeaweedFS on loopback), jobs in Redis, through real Ray Serve:
every mode completes with its inputs and outputs in S3 and none in Redis; an image reads
back byte for byte as a data URI, from /jobs/:id/images/:n and from its presigned URL; the
OpenAI `url` format; Redis memory per job; replicas and the tracker killed mid-run leave
no job lost and, after the sweep, no orphan blob; an S3 outage fails the jobs that need it
with a clear error and the service recovers when S3 returns."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from serve_app.blobs import Blobs, open_blobs
from serve_app.jobs.housekeeping import BlobSweep
from serve_app.jobs.persistence import StoreIO
from serve_app.registry import load_registry
from serve_app.settings import Settings
from serve_app.stores.redis import RedisStore
from tests.support import ROOT
from tests.support.blob_contract import check_contract
from tests.support.chaos import all_terminal, kill_replica, replaced, stats, submit
from tests.support.images import img2img, inpaint, style
from tests.support.s3 import S3Server
from tests.support.serve_harness import ServeHarness, wait_for
from tests.support.stores import REDIS_URL, redis_store

pytestmark = pytest.mark.e2e

BUCKET = "imagegen-e2e"
PREFIX = "service"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


# The null model answering a 512² photo's bytes (~400 KB, incompressible): what Redis must
# not hold. (The trained tiny-sd's flat pictures compress to a few hundred bytes.)
PHOTO = {"id": "photo", "name": "Null (512² photo bytes)", "description": "no model",
         "source": "null", "defaults": {"steps": 1, "width": 512, "height": 512},
         "runtime": {"null_image_bytes": 400_000}}


def with_photo_model() -> dict[str, Any]:
    registry = load_registry(ROOT / "config" / "models.yaml")
    return {"models": [*(m.model_dump(exclude_none=True) for m in registry.models), PHOTO]}


def blob_settings(s3: S3Server, prefix: str = PREFIX) -> dict[str, Any]:
    return {"blob_url": f"s3://{BUCKET}/{prefix}", "s3_endpoint_url": s3.endpoint}


@pytest.fixture(scope="module")
def harness(serve_harness: ServeHarness, s3: S3Server) -> ServeHarness:
    redis_store().close()  # flushes the test database, or skips without a server
    s3.bucket(BUCKET)
    serve_harness.deploy(with_photo_model(), store="redis", redis_url=REDIS_URL,
                         max_attempts=3, **blob_settings(s3))
    return serve_harness


@pytest.fixture(scope="module")
def blobs(s3: S3Server) -> Blobs:
    """The service's image store, as the test sees it."""
    return open_blobs(Settings(**blob_settings(s3)))


@pytest.fixture
def client(harness: ServeHarness) -> Iterator[httpx.Client]:
    with harness.client() as c:
        yield c


def completed(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    done = wait_for(client, job["id"])
    assert done["status"] == "completed", done
    return done


def decoded(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def test_s3_keeps_the_blob_store_contract(s3: S3Server) -> None:
    s3.bucket(BUCKET)
    check_contract(open_blobs(Settings(**blob_settings(s3, "contract"))))


def test_every_mode_keeps_its_images_in_s3_and_they_read_back_byte_for_byte(
        client: httpx.Client, blobs: Blobs, s3: S3Server) -> None:
    jobs = {
        "text2img": submit(client, **SMALL, seed=3, numImages=2),
        "img2img": client.post("/generate/img2img", json=img2img()).json(),
        "inpaint": client.post("/generate/inpaint", json=inpaint()).json(),
        "style-transfer": client.post("/generate/style-transfer", json=style()).json(),
    }
    for mode, job in jobs.items():
        done = completed(client, job)
        keys = {m.key for m in blobs.listing(f"jobs/{job['id']}/")}
        outputs = sorted(k for k in keys if "/out/" in k)
        assert len(outputs) == len(done["result"]["images"]), (mode, keys)
        if mode != "text2img":
            assert any("/in/" in k for k in keys), (mode, keys)
        urls = client.get(f"/jobs/{job['id']}", params={"images": "url"}).json()
        for n, uri in enumerate(done["result"]["images"]):
            data = decoded(uri)
            assert data == blobs.get(outputs[n])
            served = client.get(f"/jobs/{job['id']}/images/{n}")
            assert served.content == data
            assert served.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
            presigned = urls["result"]["images"][n]
            assert presigned.startswith(f"{s3.endpoint}/{BUCKET}/{PREFIX}/jobs/")
            assert "X-Amz-Signature=" in presigned
            assert httpx.get(presigned, timeout=30).content == data


def test_the_openai_client_gets_presigned_urls_and_the_same_bytes_as_b64(
        harness: ServeHarness) -> None:
    with openai.OpenAI(base_url=f"{harness.url}/v1", api_key="unused", timeout=120) as oai:
        by_url = oai.images.generate(prompt="a lake", size="64x64", response_format="url",
                                     extra_body={"seed": 11, "steps": 2})
        by_b64 = oai.images.generate(prompt="a lake", size="64x64",
                                     response_format="b64_json",
                                     extra_body={"seed": 11, "steps": 2})
    url = by_url.data[0].url
    assert url is not None and "X-Amz-Signature=" in url
    assert by_b64.data[0].b64_json is not None
    assert httpx.get(url, timeout=30).content == base64.b64decode(by_b64.data[0].b64_json)


def test_redis_holds_records_only_a_few_kb_per_512px_job(client: httpx.Client) -> None:
    server = redis.Redis.from_url(REDIS_URL)
    before = int(server.info("memory")["used_memory"])
    ids = [submit(client, prompt="a harbour", model="photo", seed=100 + i)["id"]
           for i in range(16)]
    final = all_terminal(client, ids, 300)
    assert all(j["status"] == "completed" for j in final.values()), final
    grown = int(server.info("memory")["used_memory"]) - before
    per_job = grown / len(ids)
    assert per_job <= 16 * 1024, f"{per_job:.0f} bytes of Redis per 512x512 job"


def test_killing_a_replica_and_the_tracker_mid_run_loses_nothing_and_leaves_no_orphan(
        client: httpx.Client, blobs: Blobs) -> None:
    """The tracker reloads every job from Redis: none is lost or completed twice; a
    replica killed mid-upload costs its jobs an attempt; after the sweep, every blob left
    is a recorded job's."""
    before = stats(client)
    ids = [client.post("/generate/img2img", json=img2img(seed=i, steps=12,
                                                         width=128, height=128)).json()["id"]
           for i in range(6)]
    replaced(kill_replica("model-tiny-sd"))
    replaced(kill_replica("Tracker"))
    errors: list[str] = []
    final = all_terminal(client, ids, 240, errors)
    assert [final[i]["status"] for i in ids] == ["completed"] * len(ids), (
        [(final[i]["status"], final[i].get("error"), final[i].get("attempts")) for i in ids],
        errors)
    assert all(final[i].get("attempts") in (1, 2, 3) for i in ids), final
    after = stats(client)  # reloaded from Redis: every job counted once
    assert after["completedJobs"] - before["completedJobs"] == len(ids)
    assert (after["queuedJobs"], after["processingJobs"]) == (0, 0)
    listed = client.get("/jobs", params={"limit": 500, "status": "completed"}).json()["jobs"]
    assert sorted(j["id"] for j in listed if j["id"] in ids) == sorted(ids)
    # The sweep, as if the grace period had passed: every blob left is a recorded job's.
    store = RedisStore(REDIS_URL)
    sweep = BlobSweep(blobs, StoreIO(store), grace_s=60, clock=lambda: 2**62)
    asyncio.run(sweep.run())
    store.close()
    owners = {m.key.split("/")[1] for m in blobs.listing()}
    assert set(ids) <= owners
    assert all(client.get(f"/jobs/{job_id}").status_code == 200 for job_id in owners)
    for job_id in ids:
        image = client.get(f"/jobs/{job_id}/images/0")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_an_s3_outage_fails_the_jobs_that_need_it_clearly_and_the_service_recovers(
        client: httpx.Client, s3: S3Server) -> None:
    before = completed(client, submit(client, **SMALL, seed=21))
    s3.stop()
    try:
        failing = submit(client, **SMALL, seed=22)  # no input image: accepted, then fails
        failed = wait_for(client, failing["id"], timeout_s=120)
        assert failed["status"] == "failed", failed
        assert failed["error"] == ("Job failed after 3 attempt(s): the replica could not "
                                   "reach the image store")
        refused = client.post("/generate/img2img", json=img2img())
        assert refused.status_code == 503 and "image store" in refused.json()["error"]
        assert "retry-after" in refused.headers
        unreadable = client.get(f"/jobs/{before['id']}")
        assert unreadable.status_code == 503 and "image store" in unreadable.json()["error"]
    finally:
        s3.start()
    assert completed(client, submit(client, **SMALL, seed=23))["result"]["images"]
    again = client.get(f"/jobs/{before['id']}").json()
    assert again["result"]["images"] == before["result"]["images"]
