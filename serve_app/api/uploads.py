"""A submit's input images go to the blob store before its job is acknowledged.

`build_submission` decodes, bounds and re-encodes each input image (PNG); here they are
written under the job's keys (`jobs/<id>/in/<field>.png`, the id chosen now, at the
ingress) and the task sent to the tracker carries only the keys. A store that fails is a
503 and no job is made. When the tracker refuses the job for good (a full queue, a rate
limit, an Idempotency-Key answered with the job it made first), the images are deleted at
once; when it is not known whether the job was made (the tracker or the job store did not
answer), they are left to the tracker's sweep, which deletes blobs with no record after a
grace period (`IMAGEGEN_BLOB_SWEEP_GRACE_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from serve_app.api.backend import JobsBackend
from serve_app.blobs import Blobs, input_key
from serve_app.errors import ServiceError, ServiceUnavailable
from serve_app.jobs.job import new_job_id
from serve_app.messages import GenerationTask, InputImage, Submission

log = logging.getLogger(__name__)


async def submit(backend: JobsBackend, blobs: Blobs, sub: Submission) -> dict[str, Any]:
    """The job's record (202): its input images stored, then the job submitted."""
    if not _inputs(sub.task):
        return await backend.submit(sub)
    job_id = new_job_id(time.time_ns() // 1_000_000)
    stored = dataclasses.replace(sub, job_id=job_id, task=await _store(sub.task, job_id, blobs))
    try:
        record = await backend.submit(stored)
    except ServiceError as exc:
        # Refused for good (400, 409, 429): no job holds the images. A 503 (the tracker or
        # the store did not answer) may have saved the job: the sweep decides later.
        if not isinstance(exc, ServiceUnavailable):
            await _discard(blobs, job_id)
        raise
    if record.get("id") != job_id:  # an Idempotency-Key: the job it made first
        await _discard(blobs, job_id)
    return record


def _inputs(task: GenerationTask) -> dict[str, InputImage]:
    found = {name: image for name in ("init_image", "mask_image", "style_image")
             if (image := getattr(task, name)) is not None}
    if task.control is not None:
        found["control"] = task.control.image
    return found


async def _store(task: GenerationTask, job_id: str, blobs: Blobs) -> GenerationTask:
    """`task` with each input image written to the blob store and replaced by its key."""
    images = _inputs(task)
    keys = {name: input_key(job_id, name) for name in images}
    await asyncio.gather(*(blobs.put_async(keys[name], image.png, "image/png")
                           for name, image in images.items()))
    kept = {name: dataclasses.replace(image, png=b"", key=keys[name])
            for name, image in images.items()}
    control = task.control
    if control is not None:
        control = dataclasses.replace(control, image=kept.pop("control"))
    return dataclasses.replace(task, control=control, **kept)


async def _discard(blobs: Blobs, job_id: str) -> None:
    """Best effort: what is left behind, the sweep deletes."""
    with contextlib.suppress(ServiceError):
        await asyncio.to_thread(blobs.delete_job, job_id)
