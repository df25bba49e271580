"""The playground's files as the ingress serves them (no browser, no Ray): the page and its
labels, content types and caching, nothing fetched from outside, shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from serve_app.playground import STATIC_DIR
from tests.support.trackers import http_client, make_tracker

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
STATIC_FILES = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


class Page(HTMLParser):
    """Controls, labels and buttons of a page, by id."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: dict[str, str] = {}  # id -> tag/type
        self.labels: dict[str, str] = {}  # for -> text
        self.buttons: list[dict[str, str | None]] = []
        self._label: str | None = None
        self._button: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select", "textarea", "progress"):
            self.controls[a.get("id") or f"<{tag} without id>"] = a.get("type") or tag
        if tag == "label":
            self._label, self._text = a.get("for") or "", []
        if tag == "button":
            self._button, self._text = a, []

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = " ".join("".join(self._text).split())
        if tag == "label" and self._label is not None:
            self.labels[self._label] = text
            self._label = None
        if tag == "button" and self._button is not None:
            self.buttons.append(self._button | {"text": text})
            self._button = None


@pytest.fixture
async def client(registry, settings):  # type: ignore[no-untyped-def]
    served = frozenset({"tiny-sd"})
    tracker = make_tracker(registry, settings, served=served)
    async with http_client(tracker, settings, registry, served) as c:
        yield c
    await tracker.close()


async def test_root_serves_the_page_with_a_label_for_every_control(client) -> None:
    resp = await client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = Page()
    page.feed(resp.text)
    unlabelled = sorted(c for c in page.controls if not page.labels.get(c))
    assert unlabelled == []
    assert page.labels["prompt"] == "Prompt" and page.controls["prompt"] == "textarea"
    assert page.controls["progress"] == "progress"
    submits = [b["text"] for b in page.buttons if b.get("type") == "submit"]
    assert submits == ["Generate"]
    assert all(b["text"] or b.get("aria-label") for b in page.buttons)
    assert {"Text to image", "Image to image", "Inpainting", "Style transfer", "Seed",
            "Negative", "Model", "Sampler", "Number of images", "Priority",
            "Brush size", "Eraser", "API key", "Outpainting", "Upscale", "Upscaler",
            "Scale", "Seam", "Left"} <= set(page.labels.values())
    assert 'role="alert"' in resp.text
    # Tools that match labels and names by substring (Playwright's get_by_label("Prompt"),
    # get_by_role("button", name="Generate")) find exactly one element.
    assert [t for t in page.labels.values() if "prompt" in t.lower()] == ["Prompt"]
    assert [b["text"] for b in page.buttons if "generate" in str(b["text"]).lower()] == [
        "Generate"]


@pytest.mark.parametrize("path", STATIC_FILES, ids=lambda p: p.name)
async def test_static_files_have_their_content_type_and_revalidate(client, path) -> None:
    resp = await client.get(f"/playground/{path.name}")
    assert resp.status_code == 200 and resp.content == path.read_bytes()
    assert resp.headers["content-type"].split(";")[0] == TYPES[path.suffix]
    assert resp.headers["cache-control"] == "no-cache"
    again = await client.get(f"/playground/{path.name}",
                             headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/playground/nope.js", "/playground/../http.py",
                                  "/playground/%2e%2e/http.py", "/playground/"])
async def test_anything_else_under_playground_is_a_json_404(client, path) -> None:
    resp = await client.get(path)
    assert resp.status_code == 404 and "error" in resp.json()


def test_static_files_reference_nothing_outside_the_package() -> None:
    external = re.compile(r"""\b(?:https?|wss?|ftp):|["'(]\s*//[^/\s]|@import""", re.I)
    for path in STATIC_FILES:
        hits = external.findall(path.read_text())
        assert hits == [], f"{path.name} refers outside the package: {hits}"


def test_every_file_the_page_and_modules_load_exists() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="playground/([^"]+)"', html)
    assert {"app.js", "style.css"} <= set(refs)
    for js in STATIC_DIR.glob("*.js"):
        refs += re.findall(r"""\bfrom\s+['"]\./([^'"]+)['"]""", js.read_text())
    assert sorted({r for r in refs if not (STATIC_DIR / r).is_file()}) == []


def test_static_files_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["serve_app.playground"]
    unshipped = [p.name for p in STATIC_FILES
                 if not any(fnmatch.fnmatch(f"static/{p.name}", g) for g in globs)]
    assert unshipped == []


def test_playground_does_not_import_torch() -> None:
    code = ("import sys, serve_app.playground; "
            "print(','.join(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""
