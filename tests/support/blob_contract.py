"""What every blob store must do (serve_app/blobs.py), checked against one store: a folder
and memory in the unit tier, a real S3 server end to end."""

from __future__ import annotations

import asyncio
import os

import pytest

from serve_app.blobs import Blobs
from serve_app.errors import BlobNotFound


def check_contract(blobs: Blobs) -> None:
    a = os.urandom(300_000)
    blobs.put("jobs/job_a/in/image.png", a, "image/png")
    blobs.put("jobs/job_a/out/0.png", b"zero", "image/png")
    blobs.put("jobs/job_b/out/0.webp", b"b", "image/webp")
    assert blobs.get("jobs/job_a/in/image.png") == a

    async def reads() -> None:
        assert await blobs.get_async("jobs/job_a/out/0.png") == b"zero"
        assert await blobs.get_range_async("jobs/job_a/in/image.png", 10, 20) == a[10:20]
        size, chunks = await blobs.open_async("jobs/job_a/in/image.png", chunk_size=64 * 1024)
        assert size == len(a) and b"".join([c async for c in chunks]) == a
        with pytest.raises(BlobNotFound):
            await blobs.open_async("jobs/job_z/out/0.png")
        await blobs.put_async("jobs/job_c/out/0.png", b"c", "image/png")

    asyncio.run(reads())
    listed = [m.key for m in blobs.listing()]
    assert listed == ["jobs/job_a/in/image.png", "jobs/job_a/out/0.png",
                      "jobs/job_b/out/0.webp", "jobs/job_c/out/0.png"]
    assert [m.key for m in blobs.listing(after="jobs/job_a/out/0.png")] == listed[2:]
    assert next(iter(blobs.listing())).size == len(a)
    assert blobs.delete_job("job_a") == 2
    assert [m.key for m in blobs.listing()] == listed[2:]
    with pytest.raises(BlobNotFound):
        blobs.get("jobs/job_a/out/0.png")
    assert blobs.delete_job("job_a") == 0
    assert blobs.delete([]) == 0
    blobs.delete(["jobs/job_b/out/0.webp", "jobs/job_c/out/0.png"])
    assert list(blobs.listing()) == []
