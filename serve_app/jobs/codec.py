"""Jobs as the stores keep them: `Job` <-> JSON record text, and the `JobRow` around it.

The record is the whole job in snake_case JSON, so a restart can re-dispatch it exactly. It
holds no image bytes: input and output images are keys of the blob store
(`serve_app.blobs`). Records written by earlier versions still load: free-text phases such
as "retrying: <why>", input images base64-encoded inside the task, output images as data
URIs.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from serve_app.jobs import jsontext
from serve_app.jobs.job import TRANSIENT, Job, JobResult, JobStatus, Phase
from serve_app.jobs.webhook_state import WebhookState
from serve_app.messages import (
    ControlInput,
    GenerationTask,
    HiresFix,
    InputImage,
    JobType,
    OutputFormat,
    Priority,
    UpscalerRef,
)
from serve_app.stores.contract import JobRow

_IMAGE_SLOTS = ("init_image", "mask_image", "style_image")


def _image_to_json(img: InputImage | None) -> dict[str, Any] | None:
    if img is None:
        return None
    if img.key:  # in the blob store: the record holds its key only
        return {"key": img.key, "width": img.width, "height": img.height}
    return {"png": base64.b64encode(img.png).decode(), "width": img.width, "height": img.height}


def _image_from_json(data: dict[str, Any] | None) -> InputImage | None:
    if data is None:
        return None
    if "key" in data:
        return InputImage(b"", data["width"], data["height"], key=data["key"])
    return InputImage(base64.b64decode(data["png"]), data["width"], data["height"])


def task_to_json(task: GenerationTask) -> dict[str, Any]:
    out = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    for slot in _IMAGE_SLOTS:
        out[slot] = _image_to_json(out[slot])
    out["mode"] = task.mode.value
    out["output_format"] = task.output_format.value
    out["loras"] = [[name, scale] for name, scale in task.loras]
    if task.control is not None:
        out["control"] = dataclasses.asdict(task.control) | {
            "image": _image_to_json(task.control.image)}
    if task.upscaler is not None:
        out["upscaler"] = dataclasses.asdict(task.upscaler)
    if task.outpaint is not None:
        out["outpaint"] = list(task.outpaint)
    if task.hires is not None:
        out["hires"] = dataclasses.asdict(task.hires)
    return out


def task_from_json(data: dict[str, Any]) -> GenerationTask:
    values = dict(data)
    for slot in _IMAGE_SLOTS:
        values[slot] = _image_from_json(values.get(slot))
    values["mode"] = JobType(values["mode"])
    values["output_format"] = OutputFormat(values["output_format"])
    # Records written before LoRAs and ControlNets existed have neither.
    values["loras"] = tuple((str(name), float(scale)) for name, scale in values.get("loras", ()))
    control = values.get("control")
    if control is not None:
        values["control"] = ControlInput(**control | {"image": _image_from_json(control["image"])})
    if values.get("upscaler") is not None:
        values["upscaler"] = UpscalerRef(**values["upscaler"])
    if values.get("outpaint") is not None:
        left, top, right, bottom, seam = (int(v) for v in values["outpaint"])
        values["outpaint"] = (left, top, right, bottom, seam)
    # Records written before the hires fix existed have none.
    hires = values.get("hires")
    values["hires"] = HiresFix(**hires) if hires is not None else None
    return GenerationTask(**values)


def job_to_json(job: Job) -> dict[str, Any]:
    out = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)
           if f.name not in TRANSIENT}
    out["type"] = job.type.value
    out["priority"] = job.priority.value
    out["status"] = job.status.value
    out["phase"] = job.phase.value if job.phase is not None else None
    # JobResult's fields are plain lists and dicts: no deep copy (asdict) needed to encode.
    out["result"] = dict(vars(job.result)) if job.result else None
    out["task"] = task_to_json(job.task) if job.task is not None else None
    out["webhook"] = job.webhook.to_json() if job.webhook is not None else None
    return out


def job_from_json(data: dict[str, Any]) -> Job:
    values = dict(data)
    values["type"] = JobType(values["type"])
    values["priority"] = Priority(values["priority"])
    values["status"] = JobStatus(values["status"])
    values["phase"], reason = _phase(values.get("phase"))
    if reason is not None:
        values["retry_reason"] = reason
    values["result"] = JobResult(**values["result"]) if values.get("result") else None
    values["task"] = task_from_json(values["task"]) if values.get("task") else None
    values["webhook"] = WebhookState.from_json(values["webhook"]) if values.get("webhook") else None
    return Job(**values)


def _phase(raw: str | None) -> tuple[Phase | None, str | None]:
    if raw is None:
        return None, None
    name, _, reason = raw.partition(": ")  # "retrying: <why>" before phases were an enum
    return Phase(name), reason or None


def dumps(job: Job) -> str:
    return jsontext.dumps_text(job_to_json(job))


def loads(text: str | bytes) -> Job:
    return job_from_json(jsontext.loads(text))


def to_row(job: Job) -> JobRow:
    done = job.status is JobStatus.COMPLETED and job.result is not None
    return JobRow(
        id=job.id,
        status=job.status.value,
        type=job.type.value,
        model=job.model,
        owner=job.owner,
        created_at_ms=job.created_at_ms,
        completed_at_ms=job.completed_at_ms,
        time_taken_ms=job.result.time_taken_ms if done and job.result else None,
        idempotency_key=job.idempotency_key,
        webhooks_pending=job.webhook is not None and bool(job.webhook.pending),
        record=dumps(job),
        summary=jsontext.dumps_text(job.summary()),
    )
