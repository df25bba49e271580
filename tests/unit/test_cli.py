"""The `imagegen` command against the real HTTP API on 127.0.0.1 (in process, fake replica)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imagegen.cli import main
from imagegen.client import Client
from serve_app.registry import Registry
from serve_app.settings import Settings
from tests.support.client_server import LiveServer, live_server


@pytest.fixture
def server(registry: Registry, settings: Settings) -> Iterator[LiveServer]:
    with live_server(registry, settings) as live:
        yield live


@pytest.fixture
def url(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("IMAGEGEN_URL", raising=False)
    monkeypatch.delenv("IMAGEGEN_API_KEY", raising=False)
    return server.url


def image_file(path: Path, size: tuple[int, int], color: str = "green") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def size_of(path: Path) -> tuple[str | None, tuple[int, int]]:
    with Image.open(path) as image:
        return image.format, image.size


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_generate_writes_the_png_of_the_requested_size(url, tmp_path, capsys) -> None:
    out = tmp_path / "lake.png"
    code = main(["generate", "a lake at dawn", "-o", str(out), "--size", "96x64", "--steps",
                 "3", "--seed", "42", "--sampler", "ddim", "--guidance", "5",
                 "--negative", "fog", "--url", url])
    assert code == 0
    assert size_of(out) == ("PNG", (96, 64))
    assert one_line(capsys.readouterr().out).startswith(f"{out}  (seed 42")


def test_generate_with_hires_flags_makes_the_hires_size(url, tmp_path) -> None:
    out = tmp_path / "big.png"
    assert main(["generate", "a lake", "-o", str(out), "--size", "96x64", "--steps", "2",
                 "--hires-scale", "2", "--hires-upscaler", "lanczos", "--hires-steps", "3",
                 "--hires-strength", "0.4", "--url", url]) == 0
    assert size_of(out) == ("PNG", (192, 128))
    with Client(url) as client:
        hires = client.get(client.jobs(limit=1).jobs[0].id).raw["request"]["hires"]
    assert (hires["upscaler"], hires["steps"], hires["denoisingStrength"]) == ("lanczos", 3, 0.4)
    plain = tmp_path / "plain.png"
    assert main(["generate", "a lake", "-o", str(plain), "--size", "96x64", "--steps", "2",
                 "--hires", "--url", url]) == 0
    assert size_of(plain) == ("PNG", (192, 128))  # --hires alone: the defaults (2x)
    sized = tmp_path / "sized.png"
    assert main(["generate", "a lake", "-o", str(sized), "--size", "64x64", "--steps", "2",
                 "--hires-size", "128x96", "--url", url]) == 0
    assert size_of(sized) == ("PNG", (128, 96))


def test_generate_n_writes_numbered_files_and_json_prints_the_record(url, tmp_path,
                                                                     capsys) -> None:
    out = tmp_path / "lake.png"
    assert main(["generate", "a lake", "-o", str(out), "-n", "2", "--seed", "5", "--size",
                 "64x64", "--steps", "1", "--model", "tiny-sd", "--json", "--url", url]) == 0
    record = json.loads(capsys.readouterr().out)
    files = [tmp_path / "lake-0.png", tmp_path / "lake-1.png"]
    assert record["files"] == [str(f) for f in files] and record["status"] == "completed"
    assert record["result"]["seeds"] == [5, 6] and "images" not in record["result"]
    assert record["request"]["sampler"] and record["request"]["negativePrompt"] == ""
    assert files[0].read_bytes() != files[1].read_bytes()
    assert all(size_of(f) == ("PNG", (64, 64)) for f in files)


def test_output_suffix_picks_the_format(url, tmp_path) -> None:
    out = tmp_path / "lake.jpg"
    assert main(["generate", "x", "-o", str(out), "--size", "64x64", "--steps", "1",
                 "--url", url]) == 0
    with Client(url) as client:
        (job,) = client.jobs(limit=1).jobs
        assert client.get(job).request["outputFormat"] == "jpeg"


def test_img2img_inpaint_and_style_read_their_input_files(url, tmp_path, capsys) -> None:
    src = image_file(tmp_path / "in.png", (96, 80))
    mask = image_file(tmp_path / "mask.png", (96, 80), "white")
    style = image_file(tmp_path / "style.png", (64, 64), "red")
    runs = {
        "a.png": ["img2img", str(src), "watercolor", "--strength", "0.5"],
        "b.png": ["inpaint", str(src), str(mask), "a boat", "--strength", "0.9"],
        "c.png": ["style", str(src), str(style), "--style-strength", "0.3"],
    }
    for name, argv in runs.items():
        assert main([*argv, "-o", str(tmp_path / name), "--steps", "2", "--url", url]) == 0
        assert size_of(tmp_path / name) == ("PNG", (96, 80))
    assert main(["img2img", str(tmp_path / "missing.png"), "x", "--url", url]) == 2
    assert "missing.png" in one_line(capsys.readouterr().err)


def test_a_bad_request_prints_the_services_error_and_exits_2(url, tmp_path, capsys) -> None:
    code = main(["generate", "x", "--size", "500x512", "-o", str(tmp_path / "x.png"),
                 "--url", url])
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("imagegen: width must be a multiple of 8 for model tiny-sd (got 500")
    assert err.endswith("(HTTP 400)")
    assert main(["generate", "x", "-o", str(tmp_path / "x.gif"), "--url", url]) == 2
    assert ".png, .jpg" in one_line(capsys.readouterr().err)


def test_a_failed_job_exits_1(server, url, tmp_path, capsys) -> None:
    server.dispatcher.explode = "CUDA out of memory"
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--size", "64x64",
                 "--url", url]) == 1
    assert "failed: Generation failed: the model replica raised RuntimeError" in one_line(
        capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_a_job_cancelled_meanwhile_exits_1(registry, settings, tmp_path, capsys) -> None:
    with live_server(registry, settings, hold=True) as live, Client(live.url) as client:
        codes: list[int] = []
        argv = ["generate", "x", "-o", str(tmp_path / "x.png"), "--url", live.url]
        runner = threading.Thread(target=lambda: codes.append(main(argv)))
        runner.start()
        deadline = time.monotonic() + 10
        while not (jobs := client.jobs(status="processing").jobs):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert main(["cancel", jobs[0].id, "--url", live.url]) == 0
        runner.join(10)
    assert codes == [1]
    out, err = capsys.readouterr()
    assert f"{jobs[0].id}: cancelled" in out and "cancelled" in one_line(err)


def test_jobs_show_models_and_status(url, tmp_path, capsys) -> None:
    main(["generate", "x", "--size", "64x64", "--steps", "1", "--no-wait", "--url", url])
    job_id = one_line(capsys.readouterr().out)
    with Client(url) as client:
        client.wait(job_id, timeout=10)
    assert main(["jobs", "--status", "completed", "--url", url]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "--json", "--limit", "1", "--url", url]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"][0]["id"] == job_id
    assert main(["show", job_id, "--url", url]) == 0
    assert "completed" in capsys.readouterr().out
    assert main(["--url", url, "show", job_id, "--json"]) == 0  # flags before the command too
    assert json.loads(capsys.readouterr().out)["result"]["seed"] is not None
    assert main(["models", "--url", url]) == 0
    assert "tiny-sd" in capsys.readouterr().out
    assert main(["status", "--json", "--url", url]) == 0
    assert json.loads(capsys.readouterr().out)["completedJobs"] == 1
    assert main(["show", "job_0_nope", "--url", url]) == 2
    assert one_line(capsys.readouterr().err) == "imagegen: Job not found (HTTP 404)"
    assert main(["cancel", job_id, "--url", url]) == 2
    assert "(HTTP 409)" in one_line(capsys.readouterr().err)


def test_url_and_api_key_come_from_the_environment(registry, settings, monkeypatch,
                                                   capsys) -> None:
    with live_server(registry, settings, api_key="k1-0123456789abcdef") as live:
        monkeypatch.setenv("IMAGEGEN_URL", live.url)
        monkeypatch.setenv("IMAGEGEN_API_KEY", "k1-0123456789abcdef")
        assert main(["status"]) == 0
        assert main(["status", "--api-key", "other"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "imagegen: The API key is not valid; check it, or ask for a new one (HTTP 401)")


def test_serve_is_delegated_to_the_service_cli(tmp_path, capsys) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in one_line(capsys.readouterr().err)


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "--size", "big"])
    assert exc.value.code == 2 and "size must look like 512x512" in capsys.readouterr().err


def test_the_progress_bar_follows_status_phase_and_progress() -> None:
    from rich.console import Console

    from imagegen.display import progress_bar
    from imagegen.results import Job

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    queued = Job.from_wire({"id": "job_1_a", "status": "queued", "queuePosition": 2,
                            "phase": "queued"})
    with progress_bar(queued, console=console) as update:
        update(Job.from_wire({"id": "job_1_a", "status": "processing", "progress": 40,
                              "phase": "generating", "queuePosition": 0}))
    shown = screen.getvalue()  # the first frame, then the last one before it is cleared
    assert "job_1_a queued (position 2)" in shown and "  0%" in shown
    assert "job_1_a generating" in shown and " 40%" in shown


def test_upscale_outpaint_and_upscalers(url, tmp_path, capsys) -> None:
    src = image_file(tmp_path / "in.png", (96, 80))
    assert main(["upscale", str(src), "-o", str(tmp_path / "a.png"), "--scale", "2",
                 "--upscaler", "tiny-esrgan", "--url", url]) == 0
    assert size_of(tmp_path / "a.png") == ("PNG", (192, 160))
    assert main(["upscale", str(src), "-o", str(tmp_path / "b.png"), "--width", "144",
                 "--url", url]) == 0
    assert size_of(tmp_path / "b.png") == ("PNG", (144, 120))
    assert main(["outpaint", str(src), "more", "-o", str(tmp_path / "c.png"), "--all", "16",
                 "--left", "0", "--steps", "2", "--url", url]) == 0
    assert size_of(tmp_path / "c.png") == ("PNG", (112, 112))
    capsys.readouterr()
    assert main(["upscale", str(src), "--scale", "0.5", "--url", url]) == 2
    assert "scale must be between 1 and 8" in one_line(capsys.readouterr().err)
    assert main(["upscalers", "--url", url]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("lanczos") and "tiny-esrgan" in listing
