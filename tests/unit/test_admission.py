"""Admission order at the ingress: the key's submit token is spent before the body is read,
the work budget is checked on image headers before any pixel is decoded, and what a key
sends past its budget costs no decoding. Timings (each 429 under 50 ms, the CPU of a burst)
are measured by bench/admission.py, not here."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from serve_app.api import input_images
from serve_app.registry import Registry
from serve_app.settings import Settings, load_settings
from tests.support.trackers import http_client, make_tracker, settle

pytestmark = pytest.mark.anyio
KEY = "ana-key-0123456789abcdef"
AS_ANA = {"Authorization": f"Bearer {KEY}"}


def jpeg_uri(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class Counting:
    """Counts the header reads and the full decodes of input images."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.headers = self.decodes = 0
        header, decode = input_images._open_header, input_images._open_image

        def counted_header(*args: Any) -> Any:
            self.headers += 1
            return header(*args)

        def counted_decode(*args: Any) -> Any:
            self.decodes += 1
            return decode(*args)

        monkeypatch.setattr(input_images, "_open_header", counted_header)
        monkeypatch.setattr(input_images, "_open_image", counted_decode)


@pytest.fixture
async def keyed(registry: Registry, settings: Settings) -> AsyncIterator[Any]:
    limited = load_settings(settings.model_dump(exclude={"api_keys"}) | {
        "submit_rate": 0.01, "submit_burst": 2}, env={"API_KEYS": f"ana:{KEY}"})
    tracker = make_tracker(registry, limited)
    async with http_client(tracker, limited, registry) as client:
        yield client
    await tracker.close()


async def test_past_its_burst_a_key_gets_429s_without_its_images_being_decoded(
        keyed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    body = {"prompt": "a lake", "initImage": jpeg_uri(1024), "steps": 2}
    answers = await asyncio.gather(*(keyed.post("/generate/img2img", json=body,
                                                headers=AS_ANA) for _ in range(10)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202] + [429] * 8
    assert counting.decodes == 2  # the two admitted; the eight refused were never read
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"].startswith("Too many submits")
    assert "retry-after" in refused.headers
    await settle()


async def test_invalid_requests_spend_the_token_too(keyed: Any) -> None:
    """The token goes before the body is read: a bad request costs its sender a token,
    so a flood of invalid ones is bounded by the same budget as valid ones."""
    bad = {"prompt": "a lake", "initImage": "not an image", "steps": 2}
    codes = [(await keyed.post("/generate/img2img", json=bad, headers=AS_ANA)).status_code
             for _ in range(4)]
    assert codes == [400, 400, 429, 429]


async def test_the_work_budget_is_checked_before_any_pixel_is_decoded(
        keyed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    body = {"prompt": "a lake", "initImage": jpeg_uri(2048), "steps": 150}  # 4.2 MP x 150
    resp = await keyed.post("/generate/img2img", json=body, headers=AS_ANA)
    assert resp.status_code == 400 and "megapixel-steps" in resp.json()["error"]
    assert (counting.headers, counting.decodes) == (1, 0)


def test_a_probed_size_is_the_decoded_size_exif_orientation_included() -> None:
    from serve_app.settings import Limits

    image = Image.new("RGB", (96, 40), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: decodes as 40x96
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    decoded = input_images.decode_input_image(uri, "initImage", Limits())
    assert input_images.probe_size(uri, "initImage", Limits()) == (
        decoded.width, decoded.height) == (40, 96)
