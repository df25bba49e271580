"""Request validation: a parsed JSON body's types, field names and ranges, and the model it
names.

The body comes parsed and bounded (`serve_app.api.json_body`); types and shapes come from
the pydantic models in `serve_app.api.wire`, in the spirit of diffusers' `check_inputs()`:
every message names the camelCase field and says what would be accepted. The defaults a
request leaves out are `serve_app.api.defaults`'; the job it becomes is
`serve_app.api.submission`'s.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from serve_app.api.wire import NESTED_MODELS, REQUEST_MODELS, GenerationCommon
from serve_app.errors import Forbidden, InvalidRequest, ModelNotAvailable
from serve_app.messages import SAMPLERS, Caller, HiresFix, JobType, Priority
from serve_app.registry import ModelSpec, Registry

_PROMPTLESS = (JobType.STYLE_TRANSFER, JobType.UPSCALE)
_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
}


def parse(job_type: JobType, body: Any) -> GenerationCommon:
    """Check types and field names; the first problem found is reported."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if job_type not in _PROMPTLESS and not _present(body.get("prompt")):
        raise InvalidRequest("Prompt is required")
    try:
        return REQUEST_MODELS[job_type].model_validate(body)  # type: ignore[return-value]
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc, job_type)) from None


def _present(value: Any) -> bool:
    return value is not None and (not isinstance(value, str) or value.strip() != "")


def _describe(exc: ValidationError, job_type: JobType) -> str:
    err = exc.errors()[0]
    name = _field_path(err["loc"])
    kind = err["type"]
    got = err.get("input")
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        model = NESTED_MODELS.get(str(err["loc"][0]), REQUEST_MODELS[job_type]) \
            if len(err["loc"]) > 1 else REQUEST_MODELS[job_type]
        valid = sorted({to_camel(f) for f in model.model_fields})
        return f"Unknown field {name!r}; valid fields are: {', '.join(valid)}"
    if kind in _TYPE_WORDS:
        return f"{name} must be {_TYPE_WORDS[kind]} (got {got!r})"
    if kind == "enum":
        return f"{name} must be one of: {err.get('ctx', {}).get('expected', '')} (got {got!r})"
    if kind == "finite_number":
        return f"{name} must be a finite number"
    return f"{name}: {err['msg']} (got {got!r})"


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the wire names it: `loras[0].scale`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + to_camel(part)
    return path or "body"


def resolve_model(model_id: str, registry: Registry, served: frozenset[str]) -> ModelSpec:
    spec = registry.get(model_id)
    if spec is None:
        known = ", ".join(m.id for m in registry.models)
        raise InvalidRequest(f"Unknown model {model_id!r}; available models: {known}")
    if model_id in registry.unavailable:
        raise ModelNotAvailable(registry.unavailable[model_id])
    if model_id not in served:
        raise ModelNotAvailable(
            f"Model {model_id} not loaded: its weights were not found on this server. Put "
            f"the diffusers folder or .safetensors file at the path its registry entry names "
            f"(under MODEL_PATH) and restart, or use one of: {', '.join(sorted(served))}"
        )
    return spec


def check_priority(priority: Priority, caller: Caller) -> None:
    """Priority is a privilege: a key asks for at most its `max_priority` (403)."""
    if priority.rank < caller.max_priority.rank:
        raise Forbidden(
            f"priority {priority.value!r} is above this API key's highest, "
            f"{caller.max_priority.value!r}: send priority {caller.max_priority.value!r} or "
            "lower, or ask for a key with max_priority high")


def check_sampler(sampler: str, spec: ModelSpec) -> None:
    if sampler not in SAMPLERS:
        raise InvalidRequest(f"Unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if (problem := spec.sampler_error(sampler)) is not None:  # e.g. FLUX: flow matching only
        raise InvalidRequest(problem)


def check_work(width: int, height: int, steps: int, images: int, max_work: float,
               hires: HiresFix | None = None) -> None:
    """The work budget: megapixels x steps x images, at most `max_work`; a hires fix adds
    its second pass (its megapixels x the steps it runs)."""
    megapixels = width * height / 1e6
    work = megapixels * steps
    asked = f"{width}x{height} ({megapixels:.2f} megapixels) x {steps} steps"
    if hires is not None:
        second = hires.width * hires.height / 1e6
        work += second * hires.denoising_steps
        asked = (f"({asked} + a hires pass of {hires.width}x{hires.height} ({second:.2f} "
                 f"megapixels) x {hires.denoising_steps} steps)")
    work *= images
    if work > max_work:
        raise InvalidRequest(
            f"This request asks for {asked} x {images} image(s) = {work:.0f} megapixel-steps, "
            f"over the limit of {max_work:g}: use fewer steps or images, or a smaller size")


def check_text(name: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise InvalidRequest(f"{name} is too long: {len(value)} characters, at most {max_chars}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{name} must be between {number(lo)} and {number(hi)} (got {number(value)})")


def number(x: float) -> str:
    """As a client wrote it: integers whole (a seed bound is 4294967295, not 4.29497e+09)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


