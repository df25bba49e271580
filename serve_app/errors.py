"""Domain errors. Only the HTTP layer (`serve_app.api.errors`) maps them to status codes.

Every message is written for the person who sent the request: what is wrong and how to
fix it. They cross Ray handles (they pickle), so keep them plain.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the API reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.message,))


class InvalidRequest(ServiceError):
    """The request is malformed or asks for something outside the limits (400)."""


class ModelNotAvailable(ServiceError):
    """The model exists in the registry but is not served here (400)."""


class JobNotFound(ServiceError):
    """No job has this id (404)."""

    def __init__(self, message: str = "Job not found") -> None:
        super().__init__(message)


class ImageNotFound(ServiceError):
    """The job has no image at that index (404)."""


class BlobNotFound(ImageNotFound):
    """The record names an image the blob store does not have (404): it was pruned, or
    deleted by a lifecycle rule."""


class RangeNotSatisfiable(ServiceError):
    """A `Range` outside the image (416); `size` goes in `Content-Range`."""

    def __init__(self, message: str, size: int = 0) -> None:
        super().__init__(message)
        self.size = size

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # type: ignore[override]
        return (type(self), (self.message, self.size))


class JobNotCancellable(ServiceError):
    """The job already ended (409)."""


class IdempotencyConflict(ServiceError):
    """An Idempotency-Key reused with a different request (409)."""


class Unauthorized(ServiceError):
    """No API key, or a key that is not configured (401)."""


class Forbidden(ServiceError):
    """The key is valid but may not do this (403)."""


class PayloadTooLarge(ServiceError):
    """The request body is over the limit (413)."""


class RetryLater(ServiceError):
    """A refusal that says when to try again: `retry_after_s` goes in Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # type: ignore[override]
        return (type(self), (self.message, self.retry_after_s))


class QueueFull(RetryLater):
    """The queue is at MAX_QUEUE_SIZE, or the caller's key at its own cap (429)."""


class RateLimited(RetryLater):
    """The caller's token bucket is empty (429). `limit` is the bucket's size (its burst)."""

    def __init__(self, message: str, retry_after_s: int = 1, limit: int = 0) -> None:
        super().__init__(message, retry_after_s)
        self.limit = limit

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:  # type: ignore[override]
        return (type(self), (self.message, self.retry_after_s, self.limit))


class ServiceUnavailable(RetryLater):
    """The tracker could not be reached for a while (503)."""


class NotThisShard(ServiceUnavailable):
    """A call reached a tracker shard that does not own the job's model (503): the
    ingress asks the owner; a client (during a redeploy that moved models) retries."""


class StoreUnavailable(ServiceUnavailable):
    """The job store failed a call (503): nothing was changed."""


class StoreTimeout(StoreUnavailable):
    """The job store did not answer in time (503). The call may still land later."""


class BlobStoreUnavailable(ServiceUnavailable):
    """The image store (`serve_app.blobs`) failed a call or did not answer in time (503 at
    the ingress; on a replica, a fault that fails the attempt)."""


class IllegalTransition(ServiceError):
    """A job was asked to move to a state it cannot reach from where it is (a bug, 500)."""


class ReplicaLost(Exception):
    """The replica running a job died or became unreachable; the job may be retried."""


class ConfigError(Exception):
    """The service's own configuration is wrong; raised at start, never per request."""
