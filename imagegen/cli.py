"""`imagegen`: generate images with a running service, inspect its jobs, or run it.

    imagegen generate "a red circle on a blue background" -o circle.png --seed 42
    imagegen img2img photo.png "as a watercolor" -o out.png --strength 0.6
    imagegen inpaint photo.png mask.png "a red car" -o out.png
    imagegen style content.png style.png -o out.png
    imagegen outpaint photo.png "more sky" -o out.png --all 64
    imagegen upscale photo.png -o big.png --scale 2 --upscaler tiny-esrgan  |  upscalers
    imagegen jobs [--status completed]  |  show ID  |  cancel ID  |  models  |  status
    imagegen serve [--config config/serve.yaml]  |  build-tiny-models

The service is --url or $IMAGEGEN_URL (default http://localhost:3003); an API key is
--api-key or $IMAGEGEN_API_KEY. Exit status: 0 done, 1 the job failed or was cancelled (or
was not done within --timeout), 2 a usage error or an error from or reaching the service.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagegen import display, keys
from imagegen.client import Client
from imagegen.exceptions import APIError, ImagegenError, WaitTimeout
from imagegen.payloads import GenerationOptions, HiresOptions, UpscaleOptions
from imagegen.results import Job, JobStatus
from imagegen.transport import DEFAULT_URL

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
SERVER_COMMANDS = ("serve", "build-tiny-models")
EXIT_OK, EXIT_JOB, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that cannot be run (exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.run(args)
        return code
    except (UsageError, ImagegenError, OSError) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        job = getattr(args, "submitted", None)
        hint = f"; job {job} keeps running (imagegen cancel {job})" if job else ""
        print(f"imagegen: interrupted{hint}", file=sys.stderr)
        return 130


def fail(exc: Exception) -> int:
    """One line on stderr, no traceback, and the exit status for `exc`."""
    if isinstance(exc, APIError):
        message = f"{exc.message} (HTTP {exc.status})"
    elif isinstance(exc, OSError):
        message = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    else:
        message = getattr(exc, "message", str(exc))
    print(f"imagegen: {message}", file=sys.stderr)
    return EXIT_JOB if isinstance(exc, WaitTimeout) else EXIT_USAGE


# -- commands ----------------------------------------------------------------------------

def connect(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("IMAGEGEN_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("IMAGEGEN_API_KEY") or None
    return Client(url, api_key=api_key)


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    options: dict[str, Any] = {
        "model": args.model, "steps": args.steps, "seed": args.seed, "sampler": args.sampler,
        "guidance_scale": args.guidance, "negative_prompt": args.negative,
        "priority": args.priority, "quality": args.quality,
        "num_images": args.num_images if args.num_images != 1 else None,
        "output_format": output_format(args.output),
    }
    if args.size is not None:
        options["width"], options["height"] = args.size
    return GenerationOptions(**{k: v for k, v in options.items() if v is not None})


def output_format(output: str | None) -> str | None:
    if output is None:
        return None
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"-o {output}: the name must end in .png, .jpg, .jpeg or .webp")
    return FORMATS[suffix]


def output_paths(output: str | None, job: Job) -> list[Path]:
    """`-o lake.png` for one image; lake-0.png, lake-1.png, ... for several."""
    count = len(job.result.images) if job.result else 0
    content_type = (job.result.content_type if job.result else None) or "image/png"
    path = Path(output) if output else Path(f"{job.id}.{content_type.split('/')[-1]}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def run_generation(args: argparse.Namespace, submit: Callable[[Client, Any], Job],
                   options: GenerationOptions | UpscaleOptions | None = None) -> int:
    if options is None:
        options = generation_options(args)
    with connect(args) as client:
        job = submit(client, options)
        args.submitted = job.id
        if args.no_wait:
            if args.json:
                display.print_json(job.raw)
            else:
                print(job.id)
            return EXIT_OK
        bar = not args.json and sys.stderr.isatty()
        with display.progress_bar(job, enabled=bar) as on_progress:
            done = client.wait(job, timeout=args.timeout, on_progress=on_progress,
                               raise_on_failure=False)
    result = done.result
    if done.status is not JobStatus.COMPLETED or result is None:
        if args.json:
            display.print_json(display.without_images(done.raw))
        print(f"imagegen: job {done.id} {done.status}: {done.error or 'no reason given'}",
              file=sys.stderr)
        return EXIT_JOB
    paths = output_paths(args.output, done)
    for index, path in enumerate(paths):
        path.write_bytes(done.image_bytes(index))
    if args.json:
        display.print_json(display.without_images(done.raw) | {"files": [str(p) for p in paths]})
    else:
        taken = f", {result.time_taken_ms / 1000:.1f} s" if result.time_taken_ms else ""
        for path, seed in zip(paths, result.seeds or [None] * len(paths), strict=False):
            print(f"{path}  (seed {seed}{taken})")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    hires = hires_options(args)
    return run_generation(args, lambda c, o: c.text2img(args.prompt, hires=hires, **o))


def hires_options(args: argparse.Namespace) -> HiresOptions | None:
    """The hires fix the `--hires*` flags ask for (any of them turns it on), or None."""
    hires: HiresOptions = {}
    if args.hires_scale is not None:
        hires["scale"] = args.hires_scale
    if args.hires_size is not None:
        hires["width"], hires["height"] = args.hires_size
    for flag, key in (("hires_upscaler", "upscaler"), ("hires_steps", "steps"),
                      ("hires_strength", "denoising_strength"),
                      ("hires_sampler", "sampler")):
        value = getattr(args, flag)
        if value is not None:
            hires[key] = value  # type: ignore[literal-required]
    return hires if hires or args.hires else None


def cmd_img2img(args: argparse.Namespace) -> int:
    return run_generation(
        args, lambda c, o: c.img2img(Path(args.image), args.prompt, strength=args.strength, **o))


def cmd_inpaint(args: argparse.Namespace) -> int:
    return run_generation(args, lambda c, o: c.inpaint(
        Path(args.image), Path(args.mask), args.prompt, strength=args.strength, **o))


def cmd_style(args: argparse.Namespace) -> int:
    return run_generation(args, lambda c, o: c.style_transfer(
        Path(args.content), Path(args.style), prompt=args.prompt,
        style_strength=args.style_strength, content_strength=args.content_strength, **o))


def cmd_outpaint(args: argparse.Namespace) -> int:
    pads = {side: getattr(args, side) if getattr(args, side) is not None else args.all
            for side in ("left", "top", "right", "bottom")}
    return run_generation(args, lambda c, o: c.outpaint(
        Path(args.image), args.prompt, seam=args.seam, strength=args.strength,
        **{k: v or 0 for k, v in pads.items()}, **o))


def cmd_upscale(args: argparse.Namespace) -> int:
    width, height = args.size if args.size is not None else (args.width, args.height)
    options: dict[str, Any] = {"model": args.model, "priority": args.priority,
                               "quality": args.quality, "output_format": output_format(args.output)}
    return run_generation(args, lambda c, o: c.upscale(
        Path(args.image), scale=args.scale, width=width, height=height,
        upscaler=args.upscaler, **o),
        UpscaleOptions(**{k: v for k, v in options.items() if v is not None}))  # type: ignore[typeddict-item]


def cmd_upscalers(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listing = client.upscalers()
    if args.json:
        display.print_json(listing)
        return EXIT_OK
    for u in listing:
        scale = f"x{u['scale']}" if u.get("scale") else "any"
        here = "" if u.get("present", True) else "  (weights not present)"
        print(f"{u['name']:<24} {u['kind']:<10} {scale:<4} {u.get('description', '')}{here}")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = client.jobs(status=args.status, type=args.type, model=args.model,
                           limit=args.limit, cursor=args.cursor)
    if args.json:
        display.print_json({"jobs": [j.raw for j in page.jobs], "nextCursor": page.next_cursor})
    else:
        display.show_jobs(page)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.get(args.job_id)
    if args.json:
        display.print_json(display.without_images(job.raw))
    else:
        display.show_job(job)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        result = client.cancel(args.job_id)
    if args.json:
        display.print_json({"success": result.success, "id": result.id, "status": result.status})
    else:
        print(f"{result.id}: {result.status}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    with connect(args) as client:
        models = client.models()
    if args.json:
        display.print_json([m.raw for m in models])
    else:
        display.show_models(models)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        queue = client.queue_status()
        url = client.base_url
    if args.json:
        display.print_json(queue.raw)
    else:
        display.show_status(url, queue)
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    """`serve`, `deploy` and `build-tiny-models` belong to the service: load it only for
    them."""
    from serve_app import cli as server_cli

    if args.command == "deploy":
        return server_cli.main(["deploy", args.config, "--address", args.address])
    argv = [args.command] + (["--config", args.config] if getattr(args, "config", None) else [])
    return server_cli.main(argv)


# -- the parser --------------------------------------------------------------------------

def size(text: str) -> tuple[int, int]:
    """`512x512` (or `512`, square)."""
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, not {text!r}") from None


def service_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On the top parser with real defaults; on each command with SUPPRESS, so a flag works
    # before or after the command name without the command's default hiding the top one.
    default = (lambda value: value) if top else (lambda _: argparse.SUPPRESS)
    parser.add_argument("--url", default=default(None),
                        help="the service (default: $IMAGEGEN_URL or http://localhost:3003)")
    parser.add_argument("--api-key", default=default(None),
                        help="sent as a bearer token (default: $IMAGEGEN_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the JSON record instead of a table or progress bar")


def generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="image file (.png, .jpg or .webp); with -n N: "
                        "name-0.png ... (default: <job id>.png)")
    parser.add_argument("--model", help="model id (see `imagegen models`)")
    parser.add_argument("--size", type=size, help="WIDTHxHEIGHT, multiples of 8")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--sampler", help="euler_a, euler, dpm++_2m, ddim, ...")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("-n", "--num-images", type=int, default=1)
    parser.add_argument("--priority", choices=("low", "normal", "high"))
    parser.add_argument("--quality", type=int, help="JPEG/WebP quality")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the job")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")


def hires_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "hires fix", "made at --size, then scaled up and refined in the same job (any of "
        "these turns it on; the service's defaults: scale 2, latent, strength 0.7)")
    group.add_argument("--hires", action="store_true", help="with the defaults")
    group.add_argument("--hires-scale", type=float, help="times the first pass, 1 to 4")
    group.add_argument("--hires-size", type=size, help="the final WIDTHxHEIGHT instead")
    group.add_argument("--hires-upscaler", help="latent (default), latent-bicubic, "
                       "latent-nearest, ..., lanczos, nearest")
    group.add_argument("--hires-steps", type=int, help="second pass steps (default: --steps)")
    group.add_argument("--hires-strength", type=float, help="second pass denoising, 0..1")
    group.add_argument("--hires-sampler", help="second pass sampler (default: --sampler)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    service_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                generates: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        service_flags(p, top=False)
        if generates:
            generation_flags(p)
        p.set_defaults(run=run)
        return p

    p = command("generate", cmd_generate, "text to image", generates=True)
    p.add_argument("prompt")
    hires_flags(p)
    p = command("img2img", cmd_img2img, "redraw an image after a prompt", generates=True)
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--strength", type=float, help="0..1, how much is redrawn")
    p = command("inpaint", cmd_inpaint, "repaint the white part of a mask", generates=True)
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("prompt")
    p.add_argument("--strength", type=float, help="inpainting strength, 0..1")
    p = command("style", cmd_style, "paint CONTENT in the style of STYLE", generates=True)
    p.add_argument("content")
    p.add_argument("style")
    p.add_argument("--prompt")
    p.add_argument("--style-strength", type=float)
    p.add_argument("--content-strength", type=float)
    p = command("outpaint", cmd_outpaint, "extend an image on its sides, painting the new "
                "area after a prompt (the original pixels are kept)", generates=True)
    p.add_argument("image")
    p.add_argument("prompt")
    for side in ("left", "top", "right", "bottom"):
        p.add_argument(f"--{side}", type=int, help=f"pixels to add on the {side}")
    p.add_argument("--all", type=int, default=0, help="pixels to add on every side not given")
    p.add_argument("--seam", type=int, help="width of the blended band inside the image")
    p.add_argument("--strength", type=float, help="inpainting strength, 0..1")
    p = command("upscale", cmd_upscale, "make an image larger (resampler or model upscaler)")
    p.add_argument("image")
    p.add_argument("-o", "--output", help="image file (.png, .jpg or .webp)")
    p.add_argument("--scale", type=float, help="factor, e.g. 2")
    p.add_argument("--size", type=size, help="target WIDTHxHEIGHT")
    p.add_argument("--width", type=int, help="target width (height keeps the aspect)")
    p.add_argument("--height", type=int, help="target height (width keeps the aspect)")
    p.add_argument("--upscaler", help="lanczos (default), nearest, or a model upscaler "
                   "(see `imagegen upscalers`)")
    p.add_argument("--model", help="whose replica runs it (default: the default model)")
    p.add_argument("--priority", choices=("low", "normal", "high"))
    p.add_argument("--quality", type=int, help="JPEG/WebP quality")
    p.add_argument("--timeout", type=float, help="seconds to wait for the job")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    command("upscalers", cmd_upscalers, "the upscalers the service offers")
    p = command("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--type", choices=("text2img", "img2img", "inpaint", "style-transfer",
                                      "outpaint", "upscale"))
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor", help="the cursor a previous page printed")
    command("show", cmd_show, "one job's record").add_argument("job_id")
    command("cancel", cmd_cancel, "cancel a queued or running job").add_argument("job_id")
    command("models", cmd_models, "the models the service knows")
    command("status", cmd_status, "queue statistics")
    p = sub.add_parser("serve", help="run the service locally (Ray on loopback)")
    p.add_argument("--config", help="serve config (default: config/serve.yaml)")
    p.set_defaults(run=cmd_server)
    sub.add_parser("build-tiny-models", help="build the embedded tiny models"
                   ).set_defaults(run=cmd_server)
    p = sub.add_parser("deploy", help="serve deploy with the model registry inlined, so a "
                                      "changed config/models.yaml is applied")
    p.add_argument("config", nargs="?", default="config/serve.yaml")
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS",
                                                       "http://localhost:8265"))
    p.set_defaults(run=cmd_server)
    keys.add_parser(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
