"""AUTOMATIC1111's image-changing txt2img/img2img fields beyond the basics: the hires fix
(`enable_hr` and the `hr_*` fields) in our terms, and a refusal naming the field for every
one we do not implement, so a front end never silently gets another image than it asked
for. Fields that do not change the image are left to `a1111_translate` (ignored).

What A1111 does (modules/processing.py, `StableDiffusionProcessingTxt2Img`): with
`enable_hr` the image is made at `width` x `height`, then scaled by `hr_scale` (default 2)
or to `hr_resize_x` x `hr_resize_y` (one of them 0: the aspect is kept; both: covered and
centre-cropped) with `hr_upscaler` (default "Latent"), and refined by img2img with
`hr_second_pass_steps` (0: the first pass's), `denoising_strength` (default 0.75 in its
API) and `hr_sampler_name` (default the first pass's).
"""

from __future__ import annotations

from typing import Any

from serve_app.api.compat.a1111_samplers import resolve
from serve_app.api.compat.dialects import DialectError

# A1111's hires upscaler names (`latent_upscale_modes`, then its built-in image upscalers)
# -> ours. "None" resizes with Lanczos in A1111 too (`images.resize_image`).
HR_UPSCALERS: dict[str, str] = {
    "Latent": "latent",
    "Latent (antialiased)": "latent-antialiased",
    "Latent (bicubic)": "latent-bicubic",
    "Latent (bicubic antialiased)": "latent-bicubic-antialiased",
    "Latent (nearest)": "latent-nearest",
    "Latent (nearest-exact)": "latent-nearest-exact",
    "Lanczos": "lanczos",
    "Nearest": "nearest",
    "None": "lanczos",
}
LATENT_MODES: tuple[str, ...] = tuple(n for n in HR_UPSCALERS if n.startswith("Latent"))
# A1111's txt2img API default (the web UI's is 0.7).
HR_DENOISING_STRENGTH = 0.75
_SAME_CHECKPOINT = (None, "", "Use same checkpoint")
_SAME_SAMPLER = (None, "", "Use same sampler")


def hires_fields(req: dict[str, Any], prompt: str, negative: str) -> dict[str, Any] | None:
    """Our `hires` object for a txt2img request, or None without `enable_hr` (then every
    `hr_*` field is ignored, as in A1111)."""
    if req.get("enable_hr") not in (True, 1):
        return None
    for name in ("firstphase_width", "firstphase_height"):
        if _number(req, name, 0) != 0:
            raise _unsupported(name, "the old hires fix's first-pass size is not supported; "
                               "send width and height (the first pass) and hr_scale or "
                               "hr_resize_x / hr_resize_y")
    if req.get("hr_checkpoint_name") not in _SAME_CHECKPOINT:
        raise _unsupported("hr_checkpoint_name", "the hires pass runs on the same "
                           "checkpoint here; leave it out or send 'Use same checkpoint'")
    for name, first in (("hr_prompt", prompt), ("hr_negative_prompt", negative)):
        value = req.get(name)
        if value not in (None, "") and value != first:
            raise _unsupported(name, "the hires pass uses the first pass's prompts here; "
                               "leave it out or empty")
    hires: dict[str, Any] = {}
    resize_x, resize_y = _number(req, "hr_resize_x", 0), _number(req, "hr_resize_y", 0)
    if resize_x or resize_y:
        hires.update({k: v for k, v in (("width", resize_x), ("height", resize_y)) if v})
    else:
        hires["scale"] = _number(req, "hr_scale", 2.0)
    hires["upscaler"] = _upscaler(req.get("hr_upscaler"))
    steps = _number(req, "hr_second_pass_steps", 0)
    if steps:
        hires["steps"] = steps
    strength = req.get("denoising_strength")
    hires["denoisingStrength"] = HR_DENOISING_STRENGTH if strength is None else strength
    sampler = req.get("hr_sampler_name")
    if sampler not in _SAME_SAMPLER or req.get("hr_scheduler") not in (None, ""):
        first = sampler if sampler not in _SAME_SAMPLER else (
            req.get("sampler_name") or req.get("sampler_index"))
        resolved = resolve(_text(first, "hr_sampler_name"),
                           _text(req.get("hr_scheduler") or req.get("scheduler"),
                                 "hr_scheduler"))
        if resolved is not None:
            hires["sampler"] = resolved.sampler
    return hires


def hires_params(ran: dict[str, Any]) -> dict[str, Any]:
    """A finished job's hires fix as A1111's `extra_generation_params` (and infotext) name
    it; {} without one."""
    hires = ran.get("hires")
    if not hires:
        return {}
    params: dict[str, Any] = {"Denoising strength": hires["denoisingStrength"]}
    if "scale" in hires:
        params["Hires upscale"] = hires["scale"]
    else:
        params["Hires resize"] = f"{hires['width']}x{hires['height']}"
    if hires["steps"] != ran.get("steps"):
        params["Hires steps"] = hires["steps"]
    params["Hires upscaler"] = next(n for n, ours in HR_UPSCALERS.items()
                                    if ours == hires["upscaler"])
    return params


def refuse_unsupported(req: dict[str, Any], sampler: str | None, *, img2img: bool) -> None:
    """A 400 naming the first field that would change the image in a way we do not
    implement (docs/compat.md lists what is ignored and what is refused). `sampler`: our
    sampler for the request (None: the model's default)."""
    if req.get("restore_faces") in (True, 1):
        raise DialectError("restore_faces: face restoration is not available on this server "
                           "(GET /sdapi/v1/face-restorers lists none); send restore_faces false")
    if req.get("tiling") in (True, 1):
        raise _unsupported("tiling", "seamless tiling is not supported; send tiling false")
    if _number(req, "subseed_strength", 0) != 0:
        raise _unsupported("subseed_strength", "variation seeds are not supported; send 0")
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if _number(req, name, -1) not in (0, -1):
            raise _unsupported(name, "resizing the seed is not supported; send -1")
    _refuse_sampler_options(req, sampler)
    for name in ("script_name", "refiner_checkpoint", "infotext"):
        if req.get(name) not in (None, "", "None"):
            raise _unsupported(name, "not supported here; leave it out")
    if req.get("alwayson_scripts"):
        scripts = req["alwayson_scripts"]
        named = ", ".join(scripts) if isinstance(scripts, dict) else str(scripts)
        raise _unsupported("alwayson_scripts", f"scripts ({named}) are not supported here; "
                           "send {}")
    _refuse_overrides(req.get("override_settings"))
    if img2img:
        _refuse_img2img(req)


def _refuse_sampler_options(req: dict[str, Any], sampler: str | None) -> None:
    """k-diffusion's knobs, where they change what our sampler does."""
    if _number(req, "s_churn", 0) != 0:
        raise _unsupported("s_churn", "stochastic sampling parameters are not supported; "
                           "send 0")
    if _number(req, "s_noise", 1) != 1:
        raise _unsupported("s_noise", "noise scaling is not supported; send 1")
    if _number(req, "s_min_uncond", 0) != 0:
        raise _unsupported("s_min_uncond", "skipping the negative prompt at low noise is not "
                           "supported; send 0")
    eta = req.get("eta")
    if eta is None:
        return
    # eta changes only ancestral samplers (ours: euler_a, at eta 1) and DDIM (at eta 0).
    if sampler == "euler_a" and _number(req, "eta", 1) != 1:
        raise _unsupported("eta", "Euler a runs at eta 1 here; send 1 or leave it out")
    if sampler == "ddim" and _number(req, "eta", 0) != 0:
        raise _unsupported("eta", "DDIM runs at eta 0 here; send 0 or leave it out")


# override_settings that change the image, and the value we run with.
_OVERRIDES: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (1,), "eta_noise_seed_delta": (0,), "eta_ancestral": (1,),
    "eta_ddim": (0,), "token_merging_ratio": (0,), "token_merging_ratio_hr": (0,),
    "img2img_fix_steps": (False,), "sd_vae": ("Automatic", "None", None),
    "s_churn": (0,), "s_noise": (1,), "s_min_uncond": (0,),
}


def _refuse_overrides(overrides: Any) -> None:
    if not isinstance(overrides, dict):
        return
    for name, accepted in _OVERRIDES.items():
        if name in overrides and overrides[name] not in accepted:
            raise _unsupported(f"override_settings.{name}", f"only {accepted[0]!r} is "
                               "supported here; leave it out")


def _refuse_img2img(req: dict[str, Any]) -> None:
    if _number(req, "resize_mode", 0) != 0:
        raise _unsupported("resize_mode", "the input is resized to width x height (mode 0, "
                           "'Just resize') here; send 0")
    if _number(req, "initial_noise_multiplier", 1) != 1:
        raise _unsupported("initial_noise_multiplier", "send 1 or leave it out")
    if req.get("latent_mask") not in (None, ""):
        raise _unsupported("latent_mask", "a separate latent mask is not supported")
    if not req.get("mask"):
        return
    if _number(req, "inpainting_fill", 0) not in (0, 1):
        raise _unsupported("inpainting_fill", "masked content starts from the original "
                           "image here (1, 'original'; 0, A1111's API default, is taken as "
                           "it); 'latent noise' and 'latent nothing' are not supported")
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
        if _number(req, name, 4) not in (0, 4):
            raise _unsupported(name, "masks are not blurred here (0 and A1111's default 4 "
                               "are accepted)")


def _upscaler(name: Any) -> str:
    if name is None:
        return "latent"  # A1111's `latent_upscale_default_mode`
    found = HR_UPSCALERS.get(name) if isinstance(name, str) else None
    if found is None:
        raise DialectError(f"hr_upscaler: could not find upscaler named {name!r}; this "
                           f"server has: {', '.join(HR_UPSCALERS)}")
    return found


def _number(req: dict[str, Any], name: str, default: float) -> Any:
    value = req.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DialectError(f"{name}: expected a number, got {value!r}")
    return value


def _text(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DialectError(f"{name}: expected a string, got {type(value).__name__}")


def _unsupported(name: str, why: str) -> DialectError:
    return DialectError(f"{name}: {why}")
