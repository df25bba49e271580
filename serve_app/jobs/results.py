"""What a job's end says: its result record, or the failure a client is told."""

from __future__ import annotations

import base64

from serve_app.errors import ServiceError
from serve_app.jobs.job import Job, JobResult, Preview
from serve_app.messages import GenerationResult

# Request fields echoed in `result.parameters`.
_ECHOED = ("prompt", "negativePrompt", "width", "height", "steps", "guidanceScale", "sampler",
           "strength", "inpaintingStrength", "styleStrength", "contentStrength", "numImages",
           "loras", "controlNet")


def job_result(job: Job, result: GenerationResult, now_ms: int) -> JobResult:
    """A replica's result as the job's record keeps it: references to the images the
    replica wrote to the blob store. Image bytes never reach the tracker: a result that
    carries them is a replica without a blob store, refused."""
    if result.images:
        raise ValueError(f"job {job.id}: the replica sent image bytes, not blob references")
    params = {k: job.request[k] for k in _ECHOED if k in job.request}
    params["model"] = result.model or job.model
    params["replica"] = result.replica
    return JobResult(
        images=[ref.to_json() for ref in result.refs],
        seeds=result.seeds,
        parameters=params,
        time_taken_ms=now_ms - (job.started_at_ms or now_ms),
        content_type=result.content_type,
        nsfw_detected=result.nsfw_detected,
    )


def preview_of(step: int, thumbnail: bytes) -> Preview:
    """A replica's latent thumbnail (JPEG) as the job's record shows it."""
    return Preview(step, "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode())


def gave_up(attempts: int, reason: str) -> str:
    return f"Job failed after {attempts} attempt(s): {reason}"


def describe_failure(exc: BaseException) -> str:
    """What a client is told of a failed pipeline call: a domain error's own message (it is
    written for them), else the kind of failure; details stay in the log."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps replica errors in RayTaskError
    if isinstance(cause, ServiceError):
        return f"Generation failed: {cause.message}"
    return (f"Generation failed: the model replica raised {type(cause).__name__} "
            "(details are in the service log under this job's id)")
