"""The client's request bodies (imagegen/payloads.py, written by hand so the client needs
nothing of the service) stay in step with the service's wire models (serve_app/api/wire.py):
the same options, and every body the client builds is one the route accepts."""

from __future__ import annotations

import base64
import io
from typing import Any, get_type_hints

from PIL import Image

from imagegen import payloads
from imagegen.payloads import GenerationOptions, HiresOptions, UpscaleOptions
from serve_app.api.wire import (
    REQUEST_MODELS,
    GenerationCommon,
    HiresRequest,
    UpscaleRequest,
)
from serve_app.messages import JobType


def png_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


EVERY_OPTION: GenerationOptions = {
    "negative_prompt": "fog", "width": 64, "height": 64, "steps": 3, "guidance_scale": 6.5,
    "seed": 7, "sampler": "euler", "model": "tiny-sd", "num_images": 2, "output_format": "webp",
    "quality": 80, "priority": "high", "loras": [{"name": "tiny-style", "scale": 0.5}],
    "control_net": {"model": "tiny-canny", "image": "aGk=", "conditioningScale": 0.5,
                    "preprocess": "canny"},
    "preview": True, "preview_every": 1, "webhook": "https://hooks.example.com/x",
    "webhook_events": ["completed"],
}


EVERY_UPSCALE_OPTION: UpscaleOptions = {
    "model": "tiny-sd", "output_format": "webp", "quality": 80, "priority": "high",
    "webhook": "https://hooks.example.com/x", "webhook_events": ["completed"]}


def test_the_clients_upscale_options_are_the_upscale_routes_other_fields() -> None:
    own = {"image", "scale", "width", "height", "upscaler"}
    assert set(get_type_hints(UpscaleOptions)) == set(UpscaleRequest.model_fields) - own
    assert set(EVERY_UPSCALE_OPTION) == set(get_type_hints(UpscaleOptions))


EVERY_HIRES: HiresOptions = {"scale": 1.5, "width": 128, "height": 96, "upscaler": "lanczos",
                             "steps": 3, "denoising_strength": 0.4, "sampler": "euler"}


def test_the_clients_options_are_the_fields_every_mode_shares() -> None:
    assert set(get_type_hints(GenerationOptions)) == set(GenerationCommon.model_fields)
    assert set(EVERY_OPTION) == set(GenerationCommon.model_fields)


def test_every_body_the_client_builds_is_one_its_route_accepts_with_every_field() -> None:
    uri = png_uri()
    calls = {
        JobType.TEXT2IMG: payloads.text2img("a lake", EVERY_OPTION, None, EVERY_HIRES),
        JobType.IMG2IMG: payloads.img2img(uri, "a lake", 0.5, EVERY_OPTION, None),
        JobType.INPAINT: payloads.inpaint(uri, uri, "a lake", 0.5, EVERY_OPTION, None),
        JobType.STYLE_TRANSFER: payloads.style_transfer(uri, uri, "a lake", 0.5, 0.5,
                                                        EVERY_OPTION, None),
        JobType.OUTPAINT: payloads.outpaint(uri, "a lake", (8, 8, 8, 8), 4, 0.9,
                                            EVERY_OPTION, None),
        JobType.UPSCALE: payloads.upscale(uri, 2, 128, 128, "lanczos", EVERY_UPSCALE_OPTION,
                                          None),
    }
    for job_type, call in calls.items():
        model = REQUEST_MODELS[job_type]
        assert call.path == f"/generate/{job_type.value}" and call.json is not None
        parsed = model.model_validate(call.json)  # unknown fields are refused
        sent: dict[str, Any] = parsed.model_dump(exclude_unset=True)
        # Every field of the mode was sent, options and the mode's own fields alike.
        assert set(sent) == set(model.model_fields), job_type
        if job_type is JobType.TEXT2IMG:  # and every field of the hires fix
            assert set(sent["hires"]) == set(HiresRequest.model_fields)
