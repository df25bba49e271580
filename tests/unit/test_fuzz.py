"""Fuzzing: schemathesis generates requests from our own /openapi.json and sends them to
the app over HTTP (uvicorn on loopback, the tracker in process, fake replicas), with an API
key; and a property test of the validation layer. Nothing may answer 5xx, every 4xx is a
JSON `{"error": "..."}`, and every success matches the schema it is documented with."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serve_app.api.submission import build_submission
from serve_app.errors import ServiceError
from serve_app.messages import JobType
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.client_server import SERVED, LiveServer, live_server

KEY = "fuzz-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from serve_app.registry import load_registry
    from tests.support import ROOT

    tmp = tmp_path_factory.mktemp("fuzz")
    base = Settings(data_dir=str(tmp / "data"), cache_dir=str(tmp / "models"),
                    model_path=str(tmp / "weights"), store="memory",
                    submit_rate=0, read_rate=0, max_queue_size=10_000,
                    max_queued_per_key=10_000)
    with live_server(load_registry(ROOT / "config" / "models.yaml"), base,
                     api_key=KEY) as live:
        yield live


@schemathesis.check
def error_body_is_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is a JSON `{"error": "<what is wrong>"}`; in the compatible dialects, their
    own shape: OpenAI's `{"error": {"message": ...}}`, A1111's `{"error", "detail", ...}`.
    (A HEAD answer has no body, by HTTP's definition.)"""
    if 400 <= response.status_code < 500 and case.method.upper() != "HEAD":
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        path = case.formatted_path
        error = body.get("error") if isinstance(body, dict) else None
        if path.startswith("/v1/"):
            ok = isinstance(error, dict) and isinstance(error.get("message"), str)
        elif path.startswith("/sdapi/"):
            ok = isinstance(error, str) and isinstance(body.get("detail"), str)
        else:
            ok = isinstance(error, str)
        if not ok:
            raise AssertionError(f"{response.status_code} without an {{\"error\": ...}} body: "
                                 f"{response.text[:200]}")
    return None


def test_the_api_survives_its_own_schema(server: LiveServer) -> None:
    """Every operation of /openapi.json, 25 generated requests each."""
    headers = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=headers)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, error_body_is_json]
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            try:
                case.call_and_validate(base_url=server.url, headers=headers, timeout=30,
                                       checks=checks)
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{case.method} {case.formatted_path}: {str(exc)[:400]}")

        fuzz()
    assert failures == []


# -- the validation layer ------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
FIELDS = ["prompt", "negativePrompt", "width", "height", "steps", "guidanceScale", "seed",
          "sampler", "model", "numImages", "outputFormat", "quality", "priority", "strength",
          "initImage", "image", "mask", "contentImage", "styleImage", "styleStrength",
          "contentStrength", "loras", "whatever"]
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_SCALARS | st.lists(JSON_SCALARS, max_size=3),
                    max_size=8),
    JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3))


@given(job_type=st.sampled_from(list(JobType)), body=BODIES)
@settings(max_examples=300, deadline=None, database=None)
def test_validation_answers_any_body_with_a_submission_or_a_service_error(
        job_type: JobType, body: Any) -> None:
    from serve_app.registry import load_registry
    from tests.support import ROOT

    registry: Registry = load_registry(ROOT / "config" / "models.yaml")
    try:
        sub = build_submission(job_type, body, settings=Settings(store="memory"),
                               registry=registry, served=SERVED)
    except ServiceError as exc:
        assert exc.message.strip()
    else:
        task = sub.task
        assert 64 <= task.width <= 2048 and 64 <= task.height <= 2048
        assert task.width % 8 == 0 and task.height % 8 == 0 and 1 <= task.steps <= 150
