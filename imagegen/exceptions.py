"""What the client raises: one base class, and one subclass per thing a caller may handle.

    ImagegenError
    ├── ConnectionFailed        the service could not be reached (refused, DNS, timeout)
    ├── APIError                the service answered 4xx/5xx; `.status`, `.message`
    │   ├── BadRequest          400: the message names the field and what is accepted
    │   ├── Unauthorized        401: missing or wrong API key
    │   ├── NotFound            404: unknown job, image or route
    │   ├── Conflict            409: e.g. cancelling a finished job
    │   ├── RateLimited         429: the queue is full; `.retry_after` seconds
    │   └── ServerError         5xx
    │       └── ServiceUnavailable  503; `.retry_after` seconds
    ├── JobFailed               `wait` saw the job fail; `.job` is its record
    │   └── JobCancelled        ... or be cancelled
    └── WaitTimeout             `wait`/`stream` ran past its timeout (also a TimeoutError)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen.results import Job


class ImagegenError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionFailed(ImagegenError):
    """The service could not be reached, or the connection broke mid-request."""


class APIError(ImagegenError):
    """The service answered with an error status; `message` is its `error` text."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})"


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class RateLimited(APIError):
    pass


class ServerError(APIError):
    pass


class ServiceUnavailable(ServerError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def api_error(status: int, message: str, retry_after: float | None = None) -> APIError:
    """The typed error for an HTTP status (unknown 4xx: APIError; unknown 5xx: ServerError)."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, message, retry_after)


class JobFailed(ImagegenError):
    """The job ended without images; `job` is its final record (`job.error` says why)."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} {job.status}: {job.error or 'no reason given'}")
        self.job = job


class JobCancelled(JobFailed):
    pass


class WaitTimeout(ImagegenError, TimeoutError):
    """The job was not finished when the timeout passed; it keeps running on the service."""

    def __init__(self, job_id: str, timeout_s: float, last: Job | None = None) -> None:
        state = f" (last seen {last.status}, {last.progress}%)" if last is not None else ""
        super().__init__(f"job {job_id} not finished after {timeout_s:g} s{state}")
        self.job_id = job_id
        self.last = last
