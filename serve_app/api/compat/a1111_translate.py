"""The AUTOMATIC1111 WebUI API in our terms: its request fields to our generate request
body, a finished job to its `{"images", "parameters", "info"}` answer, a job record to its
progress, and our models as its checkpoints. Pure functions (Pillow only, on the ingress
side), each rule a unit test.

Implemented fields: `prompt`, `negative_prompt`, `steps`, `cfg_scale`, `width`, `height`,
`seed` (-1 random), `sampler_name` / `sampler_index` / `scheduler`, `batch_size` x
`n_iter` images (seeds seed, seed+1, ... as in A1111), `override_settings.
sd_model_checkpoint`, `send_images`; img2img adds `init_images` (the first), `mask`,
`denoising_strength`, `inpainting_mask_invert`. Jobs ask for latent previews, which
`/progress` shows as `current_image`, as A1111's live previews. LoRAs are named in the
prompt as A1111 does, `<lora:name:multiplier>` (multiplier 1 if left out): the tags leave
the prompt and become the job's `loras` (the model's registry LoRAs; `GET
/sdapi/v1/loras` lists them).
txt2img's hires fix (`enable_hr`, `hr_*`, `denoising_strength`) and the refusal of every
image-changing field we do not implement are `serve_app.api.compat.a1111_fields`'. Every
other field is accepted and ignored (docs/compat.md lists them). Fields left out take the
model's defaults.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from datetime import datetime
from typing import Any

from PIL import ImageOps

from serve_app.api.compat.a1111_fields import hires_fields, hires_params, refuse_unsupported
from serve_app.api.compat.a1111_samplers import a1111_name, resolve
from serve_app.api.compat.dialects import DialectError
from serve_app.api.input_images import open_image
from serve_app.lora_folders import model_loras
from serve_app.messages import JobType
from serve_app.registry import ModelSpec, Registry
from serve_app.settings import Limits, Settings

VERSION = "v1.10.1-imagegen"
# Our camelCase field -> A1111's, for validation messages.
FIELD_NAMES = {
    "prompt": "prompt", "Prompt": "prompt", "negativePrompt": "negative_prompt",
    "width": "width", "height": "height", "numImages": "batch_size", "steps": "steps",
    "seed": "seed", "guidanceScale": "cfg_scale", "initImage": "init_images",
    "image": "init_images", "mask": "mask", "strength": "denoising_strength",
    "inpaintingStrength": "denoising_strength", "sampler": "sampler_name",
    "loras": "prompt", "hires": "enable_hr", "hires.scale": "hr_scale",
    "hires.width": "hr_resize_x", "hires.height": "hr_resize_y",
    "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
    "hires.denoisingStrength": "denoising_strength", "hires.sampler": "hr_sampler_name",
}
# Ours <- theirs, for the fields that map one to one.
_DIRECT = {"prompt": "prompt", "negative_prompt": "negativePrompt", "steps": "steps",
           "cfg_scale": "guidanceScale", "width": "width", "height": "height", "seed": "seed"}
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[[0-9a-fA-F]{8,64}\]$")
# <lora:name>, <lora:name:0.8>, <lora:name:0.8:0.5> (A1111's separate text-encoder weight,
# which we do not split: the first multiplier applies).
_LORA_TAG = re.compile(r"<lora:(?P<name>[^:>]+)(?::(?P<scale>[^:>]*))?(?::[^>]*)?>")


def generation_job(req: dict[str, Any], model: str | None, limits: Limits,
                   *, img2img: bool) -> tuple[JobType, dict[str, Any]]:
    """Our job type and body for a txt2img or img2img request; `model` is the checkpoint
    to use (None: the server's default). img2img decodes the mask when it must be
    inverted: run it off the event loop."""
    # A1111 shows live previews by default: so does every job it submits (`current_image`).
    body: dict[str, Any] = {"outputFormat": "png", "preview": True}
    for theirs, ours in _DIRECT.items():
        if req.get(theirs) is not None:
            body[ours] = req[theirs]
    if isinstance(body.get("prompt"), str):
        body["prompt"], loras = lora_tags(body["prompt"])
        if loras:
            body["loras"] = loras
    body["numImages"] = _count(req, "batch_size") * _count(req, "n_iter")
    resolved = resolve(_text(req, "sampler_name") or _text(req, "sampler_index"),
                       _text(req, "scheduler"))
    if resolved is not None:
        body["sampler"] = resolved.sampler
    if model is not None:
        body["model"] = model
    refuse_unsupported(req, body.get("sampler"), img2img=img2img)
    if req.get("disable_extra_networks") in (True, 1):
        body.pop("loras", None)  # the tags leave the prompt, unapplied, as in A1111
    if not img2img:
        hires = hires_fields(req, req.get("prompt") or "", req.get("negative_prompt") or "")
        if hires is not None:
            body["hires"] = hires
        return JobType.TEXT2IMG, body
    init = req.get("init_images")
    if not isinstance(init, list) or not init:
        raise DialectError("Init image not found", 404)
    strength = req.get("denoising_strength")
    mask = req.get("mask")
    if not mask:
        body["initImage"] = init[0]
        if strength is not None:
            body["strength"] = strength
        return JobType.IMG2IMG, body
    if req.get("inpainting_mask_invert") in (1, True):
        mask = _inverted(mask, limits)
    body.update(image=init[0], mask=mask)
    if strength is not None:
        body["inpaintingStrength"] = strength
    return JobType.INPAINT, body


def _text(req: dict[str, Any], name: str) -> str | None:
    """A field that must be a string (or absent): anything else is A1111's 422 as a 400."""
    value = req.get(name)
    if value is None or isinstance(value, str):
        return value
    raise DialectError(f"{name}: expected a string, got {type(value).__name__} "
                       f"({json.dumps(value)[:40]})")


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its `<lora:name:multiplier>` tags, and those LoRAs in our terms."""
    loras = []
    for tag in _LORA_TAG.finditer(prompt):
        raw = (tag["scale"] or "").strip()
        try:
            scale = float(raw) if raw else 1.0
        except ValueError:
            raise DialectError(f"LoRA multiplier in {tag[0]!r} is not a number; write "
                               "<lora:name:0.8>") from None
        loras.append({"name": tag["name"].strip(), "scale": scale})
    cleaned = " ".join(_LORA_TAG.sub(" ", prompt).split()) if loras else prompt
    return cleaned, loras


def lora_entries(spec: ModelSpec, model_path: str = "") -> list[dict[str, Any]]:
    """`GET /sdapi/v1/loras`: a model's LoRAs (registry ones and its folders' files), as
    A1111 lists its LoRA files."""
    return [{"name": lo.name, "alias": lo.name, "path": f"{lo.name}.safetensors",
             "metadata": {"description": lo.description}}
            for lo in model_loras(spec, model_path)]


def generation_response(record: dict[str, Any], req: dict[str, Any],
                        checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A finished job as A1111 answers txt2img/img2img: bare base64 PNGs, the request as
    `parameters`, and `info`, a JSON string. A cancelled (interrupted) job answers with
    no images, as A1111 does when interrupted before its first image."""
    result = record.get("result") or {}
    images = [uri.partition(",")[2] for uri in result.get("images", [])]
    ran = record["request"]
    named = a1111_name(ran["sampler"])
    seeds = list(result.get("seeds") or [ran["seed"]])
    prompt, negative = ran.get("prompt", ""), ran.get("negativePrompt", "")
    infotexts = [_infotext(ran, named.name, named.scheduler, seed, checkpoint)
                 for seed in seeds[: len(images)]]
    info = {
        "prompt": prompt, "all_prompts": [prompt] * len(seeds),
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": ran["width"], "height": ran["height"],
        "sampler_name": named.name, "scheduler": named.scheduler,
        "cfg_scale": ran["guidanceScale"], "steps": ran["steps"],
        "batch_size": _count(req, "batch_size"), "n_iter": _count(req, "n_iter"),
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": checkpoint["model_name"], "sd_model_hash": checkpoint["hash"],
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": ran.get(
            "strength", ran.get("inpaintingStrength", (ran.get("hires") or {}).get(
                "denoisingStrength"))),
        "extra_generation_params": {"Schedule type": named.scheduler} | hires_params(ran),
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": _timestamp(record.get("createdAt")), "clip_skip": 1,
        "is_using_inpainting_conditioning": record["type"] == "inpaint",
        "version": VERSION, "job_id": record["id"],
        "interrupted": record["status"] == "cancelled",
    }
    parameters = {k: v for k, v in req.items() if k not in ("init_images", "mask")}
    if "init_images" in req or "mask" in req:
        parameters.update(init_images=None, mask=None)
    send = req.get("send_images", True) is not False
    return {"images": images if send else [], "parameters": parameters,
            "info": json.dumps(info)}


def progress_body(record: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """`GET /sdapi/v1/progress` for the caller's last job (None: it has none)."""
    running = record is not None and record["status"] in ("queued", "processing")
    state: dict[str, Any] = {
        "skipped": False, "interrupted": record is not None and record["status"] == "cancelled",
        "stopping_generation": False, "job": "", "job_count": 0, "job_timestamp": "0",
        "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
    }
    if record is None or not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None, "current_task": record["id"] if record else None}
    steps = int(record["request"].get("steps") or 0)
    hires = record["request"].get("hires")
    if hires:  # progress counts both passes; the second runs strength x its steps
        steps += max(1, min(hires["steps"], int(hires["steps"] * hires["denoisingStrength"])))
    done = record.get("progress", 0) / 100
    progress = min(1.0, max(0.01, done))
    eta = 0.0
    started = _parse_time(record.get("startedAt"))
    if started is not None and done > 0:
        elapsed = max(0.0, (now - started).total_seconds())
        eta = elapsed / done - elapsed
    state.update(job=record["type"], job_count=1,
                 job_timestamp=_timestamp(record.get("createdAt")),
                 sampling_step=round(done * steps), sampling_steps=steps)
    phase = record.get("phase") or record["status"]
    text = (f"Queued (position {record['queuePosition']})"
            if record["status"] == "queued" and record.get("queuePosition") else phase)
    # A1111's live preview: the job's latest latent thumbnail (base64, no data URI prefix).
    preview = record.get("preview")
    current = preview["image"].partition(",")[2] if isinstance(preview, dict) else None
    return {"progress": progress, "eta_relative": eta, "state": state, "current_image": current,
            "textinfo": text, "current_task": record["id"]}


def checkpoint(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """A model as A1111 lists a checkpoint. `sha256` identifies the registry entry (id,
    version, source, path), not the weights' bytes: reading gigabytes to hash them is
    not the ingress's job."""
    identity = "\n".join((spec.id, spec.version, spec.source, spec.path or ""))
    sha256 = hashlib.sha256(identity.encode()).hexdigest()
    return {"title": f"{spec.id} [{sha256[:10]}]", "model_name": spec.id,
            "hash": sha256[:10], "sha256": sha256,
            "filename": str(spec.weights_path(settings)), "config": None}


def find_checkpoint(name: str, registry: Registry, served: frozenset[str]) -> str | None:
    """The model id a client's checkpoint name means: a title ("id [hash]"), a model name,
    or a file name with its extension; None if none is served."""
    text = name.strip()
    match = _TITLE.match(text)
    if match:
        text = match["name"]
    for suffix in (".safetensors", ".ckpt"):
        text = text.removesuffix(suffix)
    text = text.rsplit("/", 1)[-1]
    spec = registry.get(text)
    return spec.id if spec is not None and spec.id in served else None


def _infotext(ran: dict[str, Any], sampler: str, scheduler: str, seed: int,
              checkpoint: dict[str, Any]) -> str:
    lines = [ran.get("prompt", "")]
    if ran.get("negativePrompt"):
        lines.append(f"Negative prompt: {ran['negativePrompt']}")
    lines.append(
        f"Steps: {ran['steps']}, Sampler: {sampler}, Schedule type: {scheduler}, "
        f"CFG scale: {ran['guidanceScale']:g}, Seed: {seed}, "
        f"Size: {ran['width']}x{ran['height']}, Model hash: {checkpoint['hash']}, "
        f"Model: {checkpoint['model_name']}, "
        + "".join(f"{k}: {v}, " for k, v in hires_params(ran).items()) + f"Version: {VERSION}")
    return "\n".join(lines)


def _count(req: dict[str, Any], name: str) -> int:
    value = req.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DialectError(f"{name} must be a whole number of at least 1 (got {value!r})")
    return value


def _inverted(mask: Any, limits: Limits) -> str:
    """The mask with repaint and keep swapped. A mask with transparency is read from its
    alpha (opaque = repaint), as A1111 reads one."""
    picture = open_image(mask, "mask", limits)
    alpha = picture.convert("RGBA").getchannel("A") if "A" in picture.getbands() else None
    if alpha is not None and alpha.getextrema() != (255, 255):
        inverted = ImageOps.invert(alpha)
    else:
        inverted = ImageOps.invert(picture.convert("L"))
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _timestamp(value: Any) -> str:
    """A1111's job timestamp: YYYYmmddHHMMSS."""
    parsed = _parse_time(value)
    return parsed.strftime("%Y%m%d%H%M%S") if parsed else "0"
