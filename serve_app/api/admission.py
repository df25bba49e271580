"""Admission of a submit, in the order that spends the least on a request refused:
authentication and the body's declared size (the guard), then the key's submit token (here,
before a byte of the body is read; the bucket is the tracker's, shared by every ingress
replica), then the JSON, cheap validation and the work budget (from image headers), and
last the decoding of input images. A key past its budget gets its 429 without the ingress
reading, parsing or decoding anything it sent."""

from __future__ import annotations

from fastapi import Request

from serve_app.api.context import context
from serve_app.api.guard import caller_of


async def admit(request: Request) -> None:
    """Spend the caller's submit token, or raise its 429."""
    await context(request).backend.admit(caller_of(request))
    request.state.admitted = True


def admitted(request: Request) -> bool:
    """Whether `admit` spent this request's token (its submission spends no second one)."""
    return bool(getattr(request.state, "admitted", False))
