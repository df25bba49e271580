"""AUTOMATIC1111's sampler and scheduler names, and ours behind them.

A1111 (1.9 and later) names a sampler and, apart, a scheduler (the sigma schedule):
"DPM++ 2M" with scheduler "Karras". Older clients put the scheduler in the sampler's name
("DPM++ 2M Karras"); both are read. "Automatic" is the sampler's own default schedule, as
in A1111 (Karras for DPM++ 2M), "Uniform" the plain one. Names are matched without regard
to case, with A1111's aliases (`k_euler_a`, ...). A sampler A1111 would not know is
answered as A1111 answers it: 404 "Sampler not found"; one A1111 knows but we do not run
(DPM++ SDE, ...) gets the same. Schedules other than these three are refused (400).
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.api.compat.dialects import DialectError


@dataclass(frozen=True)
class A1111Sampler:
    name: str
    aliases: tuple[str, ...]
    plain: str  # our sampler on the uniform schedule
    karras: str | None = None  # our sampler on Karras sigmas, where we have one
    automatic_is_karras: bool = False  # A1111's "Automatic" schedule for it is Karras
    options: tuple[tuple[str, str], ...] = ()


SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++_2m", "dpm++_2m_karras",
                 automatic_is_karras=True, options=(("scheduler", "karras"),)),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a",
                 options=(("uses_ensd", "True"),)),
    A1111Sampler("Euler", ("k_euler",), "euler"),
    A1111Sampler("LMS", ("k_lms",), "lms"),
    A1111Sampler("Heun", ("k_heun",), "heun", options=(("second_order", "True"),)),
    A1111Sampler("DDIM", ("ddim",), "ddim"),
    A1111Sampler("PLMS", ("plms",), "plms"),
    A1111Sampler("UniPC", ("unipc",), "unipc"),
)
# name (lower case) -> label, as A1111's /sdapi/v1/schedulers lists them.
SCHEDULERS: dict[str, str] = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}

_BY_NAME = {n.lower(): s for s in SAMPLERS for n in (s.name, *s.aliases)}


@dataclass(frozen=True)
class Resolved:
    """Our sampler, and how A1111 names what runs (reported back in `info`)."""

    sampler: str
    name: str
    scheduler: str


def resolve(sampler_name: str | None, scheduler: str | None) -> Resolved | None:
    """Our sampler for A1111's `sampler_name` (or `sampler_index`) and `scheduler`; None
    when the request names no sampler (the model's default runs)."""
    if not sampler_name or not sampler_name.strip():
        return None
    name = sampler_name.strip()
    chosen = (scheduler or "automatic").strip().lower() or "automatic"
    for key, label in SCHEDULERS.items():
        suffix = " " + label.lower()
        if key != "automatic" and name.lower().endswith(suffix) and chosen == "automatic":
            name, chosen = name[: -len(suffix)], key  # the legacy "DPM++ 2M Karras"
    found = _BY_NAME.get(name.lower())
    if found is None:
        raise DialectError("Sampler not found", 404)
    if chosen not in SCHEDULERS:
        raise DialectError(f"Scheduler {scheduler!r} is not available here; use one of: "
                           f"{', '.join(SCHEDULERS.values())}")
    karras = chosen == "karras" or (chosen == "automatic" and found.automatic_is_karras)
    if karras and found.karras is None:
        usable = ", ".join(s.name for s in SAMPLERS if s.karras)
        raise DialectError(f"Scheduler 'Karras' is available here only with: {usable}")
    ours = found.karras if karras and found.karras else found.plain
    return Resolved(ours, found.name, SCHEDULERS[chosen])


def a1111_name(sampler: str) -> Resolved:
    """How A1111 names our `sampler` (for a job run with the model's default)."""
    for entry in SAMPLERS:
        if sampler == entry.karras:
            return Resolved(sampler, entry.name, "Karras")
        if sampler == entry.plain:
            uniform = entry.automatic_is_karras
            return Resolved(sampler, entry.name, "Uniform" if uniform else "Automatic")
    return Resolved(sampler, sampler, "Automatic")


def samplers_list() -> list[dict[str, object]]:
    """`GET /sdapi/v1/samplers`."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)}
            for s in SAMPLERS]


def schedulers_list() -> list[dict[str, object]]:
    """`GET /sdapi/v1/schedulers`."""
    return [{"name": name, "label": label, "aliases": None,
             "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False}
            for name, label in SCHEDULERS.items()]
