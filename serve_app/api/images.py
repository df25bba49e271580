"""The ingress's side of images: a job record's blob references made into what the client
asked for, and an image's bytes for `GET /jobs/:id/images/:n`.

Records (as the tracker or the store renders them) carry references (`ImageRef.to_json()`);
a client gets `result.images` as data URIs by default, read from the blob store here, or
with `?images=url` as URLs: presigned GET URLs on an S3 store (valid
`IMAGEGEN_PRESIGN_EXPIRY_S`), else this service's own `/jobs/:id/images/:n`. A record
written before images left records holds data URIs: served as they are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from serve_app.blobs import Blobs
from serve_app.errors import BlobNotFound, InvalidRequest
from serve_app.messages import ImageRef


class ImageMode(StrEnum):
    DATA = "data"
    URL = "url"

    @classmethod
    def parse(cls, raw: str | None) -> ImageMode:
        if not raw:
            return cls.DATA
        try:
            return cls(raw)
        except ValueError:
            raise InvalidRequest(f"images must be data or url (got {raw!r})") from None


@dataclass(frozen=True)
class ImageBody:
    """An image to send: its size, content type, ETag and bytes (whole or in chunks)."""

    size: int
    content_type: str
    etag: str | None
    chunks: AsyncIterator[bytes]


class ImageReader:
    def __init__(self, blobs: Blobs, presign_expiry_s: int) -> None:
        self.blobs = blobs
        self.presign_expiry_s = presign_expiry_s

    # -- a job record -------------------------------------------------------------------

    async def render(self, record: bytes, mode: ImageMode, base_url: str) -> bytes:
        """`record` (JSON) with its result's images as `mode` says."""
        if b'"images"' not in record:  # not completed: nothing to do, nothing parsed
            return record
        data = json.loads(record)
        result = data.get("result")
        if not result or not result.get("images"):
            return record
        await self.expand(data, mode, base_url)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    async def expand(self, data: dict[str, Any], mode: ImageMode, base_url: str) -> None:
        """In place: a parsed record's `result.images` as data URIs or URLs."""
        result = data.get("result")
        if not result:
            return
        if mode is ImageMode.URL:
            result["images"] = self.urls(data, base_url)
        else:
            result["images"] = await asyncio.gather(*(self.data_uri(e)
                                                      for e in result.get("images", [])))

    def urls(self, data: dict[str, Any], base_url: str) -> list[str]:
        """A parsed record's image URLs (without changing it)."""
        result = data.get("result") or {}
        return [self.url(data["id"], i, entry, base_url)
                for i, entry in enumerate(result.get("images", []))]

    async def data_uri(self, entry: dict[str, Any] | str) -> str:
        if isinstance(entry, str):
            return entry  # a record written before images left records
        ref = ImageRef.from_json(entry)
        data = await self.blobs.get_async(ref.key)
        return f"data:{ref.content_type};base64,{base64.b64encode(data).decode()}"

    def url(self, job_id: str, index: int, entry: dict[str, Any] | str, base_url: str) -> str:
        if isinstance(entry, dict) and self.blobs.signs:
            return self.blobs.presigned(str(entry["key"]), self.presign_expiry_s)
        return f"{base_url.rstrip('/')}/jobs/{job_id}/images/{index}"

    # -- one image --------------------------------------------------------------------

    async def open(self, entry: dict[str, Any], byte_range: tuple[int, int] | None = None
                   ) -> ImageBody:
        """An image as `backend.image` located it; `byte_range` (start, end exclusive)."""
        if "dataUri" in entry:
            content_type, data = _decode(str(entry["dataUri"]))
            if byte_range is not None:
                data = data[byte_range[0]:byte_range[1]]
            return ImageBody(len(data), content_type, None, _once(data))
        ref = ImageRef.from_json(entry)
        if byte_range is not None:
            data = await self.blobs.get_range_async(ref.key, *byte_range)
            return ImageBody(len(data), ref.content_type, ref.sha256, _once(data))
        size, chunks = await self.blobs.open_async(ref.key)
        return ImageBody(size, ref.content_type, ref.sha256, chunks)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _decode(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    try:
        return head.removeprefix("data:").split(";")[0], base64.b64decode(payload)
    except (binascii.Error, ValueError):
        raise BlobNotFound("The stored image is unreadable") from None
