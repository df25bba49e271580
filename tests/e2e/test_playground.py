"""The playground in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) against the real Ray Serve app: the page is used by its labels, as a
person would, and each test checks what reached the service.

Screenshots go to the pytest tmp folder (`playground-screenshots`); with
`IMAGEGEN_UPDATE_SCREENSHOT=1` the first test also rewrites `docs/playground.png`.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops

from tests.support.serve_harness import ServeHarness, wait_for

EXAMPLE_PROMPT = "a red circle on a blue background"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                "chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GENERATED = "//img[starts-with(@alt, 'Generated image')]"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1360,1000")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("playground-screenshots")


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver: WebDriver, serve_harness: ServeHarness) -> Iterator[WebDriver]:
    driver.get(serve_harness.url + "/")
    # The model list arrives from GET /models: the page is ready once it has.
    wait(driver, 30).until(lambda d: control(d, "Model").get_attribute("value") == "tiny-sd")
    yield driver
    # Responses with an error status are logged too; those are the API's answers.
    errors = [e["message"] for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert errors == []


@pytest.fixture(scope="module", autouse=True)
def inpainting_model_started(serve_harness: ServeHarness) -> None:
    """An inpainting job submitted as the module starts: the inpainting model scales from
    zero, and its cold start (tens of seconds on two cores) then overlaps the other tests."""
    mask = Image.new("L", (128, 96))
    mask.paste(255, (32, 32, 96, 64))
    with serve_harness.client() as c:
        resp = c.post("/generate/inpaint", json={
            "prompt": "warm up", "image": data_uri(gradient()), "mask": data_uri(mask),
            "steps": 1})
        assert resp.status_code == 202, resp.text


@pytest.fixture
def client(serve_harness: ServeHarness) -> Iterator[httpx.Client]:
    with serve_harness.client() as c:
        yield c


def wait(driver: WebDriver, timeout_s: float = 60) -> WebDriverWait:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05)


def label(driver: WebDriver, text: str) -> WebElement:
    return driver.find_element(By.XPATH, f"//label[normalize-space()='{text}']")


def control(driver: WebDriver, text: str) -> WebElement:
    """The form control labelled `text`."""
    return driver.find_element(By.ID, label(driver, text).get_attribute("for"))


def button(driver: WebDriver, text: str) -> WebElement:
    return driver.find_element(By.XPATH, f"//button[normalize-space()='{text}']")


def fill(driver: WebDriver, **fields: Any) -> None:
    """Type into the controls labelled by the keys (underscores for spaces)."""
    for name, value in fields.items():
        el = control(driver, name.replace("_", " ").capitalize())
        el.clear()
        el.send_keys(str(value))


def generate(driver: WebDriver, timeout_s: float = 90) -> list[WebElement]:
    button(driver, "Generate").click()
    return wait(driver, timeout_s).until(lambda d: d.find_elements(By.XPATH, GENERATED))


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decoded(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def snap(driver: WebDriver, path: Path) -> None:
    """A screenshot of the whole page, not only the part scrolled into view."""
    width, height = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight];")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def job_id(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "job-meta").text.split(" · ")[0]


def test_the_progress_bar_moves_and_cancel_stops_the_job(page, client, shots) -> None:
    fill(page, prompt="a slow one")
    fill(page, width=256, height=256, steps=64)  # ~0.3 s a step here: long enough to watch
    button(page, "Generate").click()
    bar = control(page, "Progress")
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(set(seen) - {0}) < 2 and time.monotonic() < deadline:
        seen.append(int(bar.get_attribute("value")))
        time.sleep(0.05)
    rising = sorted(set(seen) - {0})
    assert len(rising) >= 2 and seen == sorted(seen), seen  # live, and never backwards
    assert page.find_element(By.ID, "phase").text.startswith("Generating")
    # The image forming: a latent preview every 64 // 8 = 8 steps, at most 128 px.
    forming = wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.forming"))[0]
    assert forming.get_attribute("src").startswith("data:image/jpeg;base64,")
    step = int(forming.get_attribute("alt").removeprefix("The image forming (step ")[:-1])
    assert step % 8 == 0 and step < 64
    assert page.execute_script("return arguments[0].naturalWidth", forming) == 128
    snap(page, shots / "progress.png")

    button(page, "Cancel").click()
    wait(page).until(lambda d: d.find_element(By.ID, "phase").text.startswith("Cancelled"))
    job = client.get(f"/jobs/{job_id(page)}").json()
    assert job["status"] == "cancelled" and rising[-1] <= job["progress"] < 100
    assert page.find_elements(By.XPATH, GENERATED) == []
    assert button(page, "Generate").is_enabled() and not button(page, "Cancel").is_enabled()


def test_server_errors_are_shown_from_their_error_bodies(page) -> None:
    fill(page, prompt="x")
    fill(page, width=100)
    button(page, "Generate").click()
    alert = page.find_element(By.CSS_SELECTOR, "[role=alert]")
    wait(page, 10).until(lambda d: alert.text)
    assert "multiple of 8" in alert.text and "width" in alert.text


def test_img2img_with_an_uploaded_file(page, client, shots, tmp_path) -> None:
    source = tmp_path / "input.png"
    gradient().save(source)
    label(page, "Image to image").click()
    control(page, "Input image").send_keys(str(source))
    fill(page, prompt="watercolor")
    # The uploaded image sets the output size (rounded down to multiples of 8).
    wait(page, 10).until(lambda d: control(d, "Width").get_attribute("value") == "128")
    assert control(page, "Height").get_attribute("value") == "96"
    fill(page, steps=6)
    [image] = generate(page)
    assert decoded(image.get_attribute("src")).size == (128, 96)
    job = client.get(f"/jobs/{job_id(page)}").json()
    assert job["type"] == "img2img" and job["request"]["strength"] == 0.75
    snap(page, shots / "img2img.png")


def test_inpainting_with_a_mask_painted_on_the_canvas(page, client, shots, tmp_path) -> None:
    source = tmp_path / "input.png"
    gradient().save(source)
    label(page, "Inpainting").click()
    control(page, "Image to inpaint").send_keys(str(source))
    fill(page, prompt="a red boat")
    canvas = page.find_element(By.ID, "mask-canvas")
    wait(page, 10).until(lambda d: canvas.get_attribute("width") == "128")
    ActionChains(page).move_to_element_with_offset(canvas, -80, -30).click_and_hold() \
        .move_by_offset(70, 20).move_by_offset(70, 20).release().perform()
    fill(page, steps=6)
    # Its inpainting model may still be starting (see inpainting_model_started).
    [image] = generate(page, timeout_s=120)
    snap(page, shots / "inpaint.png")

    # The page sends the brush's coverage as the mask; the service repaints at >= 50 % and
    # keeps every other pixel exactly.
    alpha = page.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data;"
        "return Array.from(d.filter((_, i) => i % 4 === 3));", canvas)
    result = decoded(image.get_attribute("src"))
    diff = ImageChops.difference(result, gradient()).convert("L").tobytes()  # row-major
    painted = [d for d, a in zip(diff, alpha, strict=True) if a >= 128]
    kept = [d for d, a in zip(diff, alpha, strict=True) if a < 128]
    assert len(painted) > 100 and sum(d > 0 for d in painted) > len(painted) // 2
    assert max(kept) == 0
    assert client.get(f"/jobs/{job_id(page)}").json()["type"] == "inpaint"


def test_style_transfer_with_one_image_uploaded_and_one_dropped(page, client, tmp_path) -> None:
    content = tmp_path / "content.png"
    gradient().save(content)
    label(page, "Style transfer").click()
    control(page, "Content image").send_keys(str(content))
    style = Image.new("RGB", (64, 48), "navy")
    style.paste("orange", (0, 0, 32, 48))
    page.execute_async_script("""
        const [uri, id, done] = arguments;
        fetch(uri).then((r) => r.blob()).then((blob) => {
          const data = new DataTransfer();
          data.items.add(new File([blob], 'style.png', { type: 'image/png' }));
          const zone = document.getElementById(id).closest('.drop');
          zone.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true,
                                                     cancelable: true }));
          done();
        });
    """, data_uri(style), label(page, "Style image").get_attribute("for"))
    preview = page.find_element(By.XPATH, "//img[@alt='Style image preview']")
    wait(page, 10).until(lambda d: preview.is_displayed())
    fill(page, steps=4)
    [image] = generate(page)
    assert decoded(image.get_attribute("src")).size == (128, 96)  # the content image's
    job = client.get(f"/jobs/{job_id(page)}").json()
    assert job["type"] == "style-transfer"
    assert job["request"]["styleImage"]["width"] == 64
    assert job["request"]["contentImage"]["width"] == 128


def test_generate_through_the_page_by_its_labels(page, client, shots) -> None:
    # The page starts with an example prompt the embedded model can draw.
    assert control(page, "Prompt").get_attribute("value") == EXAMPLE_PROMPT
    fill(page, prompt="a yellow triangle on the left, purple background")
    fill(page, steps=20, seed=1234, number_of_images=2)
    images = generate(page)
    assert [i.get_attribute("alt") for i in images] == [
        "Generated image 1 (seed 1234)", "Generated image 2 (seed 1235)"]
    assert "Used seeds: 1234, 1235" in page.find_element(By.ID, "seed-used").text
    wait(page).until(lambda d: d.execute_script(  # history has this job and every thumbnail
        "const n = (s) => document.querySelectorAll('#history-list ' + s).length;"
        "return n(`[title='${arguments[0]}'] img`) === 1"
        "  && n('.badge.completed') === n('.thumb img');", job_id(page)))
    snap(page, shots / "text2img.png")
    if os.environ.get("IMAGEGEN_UPDATE_SCREENSHOT") == "1":
        snap(page, ROOT / "docs" / "playground.png")
    # The page asked for exactly what the form said: the API gives the same bytes.
    resp = client.post("/generate/text2img", json={
        "prompt": "a yellow triangle on the left, purple background", "width": 64,
        "height": 64, "steps": 20, "seed": 1234, "numImages": 2, "guidanceScale": 3.0,
        "sampler": "ddim", "model": "tiny-sd"})
    same = wait_for(client, resp.json()["id"])
    assert [i.get_attribute("src") for i in images] == same["result"]["images"]

    control(page, "Seed").clear()
    reuse = button(page, "Reuse these settings")  # image 1: its seed, one image
    page.execute_script("arguments[0].scrollIntoView({block: 'center'})", reuse)
    reuse.click()
    wait(page, 10).until(lambda d: control(d, "Seed").get_attribute("value") == "1234")
    assert control(page, "Number of images").get_attribute("value") == "1"


def test_history_pages_through_the_job_list_and_opens_a_job(page, client) -> None:
    jobs = [client.post("/generate/text2img", json={
        "prompt": f"page {n}", "width": 64, "height": 64, "steps": 1}).json() for n in range(3)]
    done = [wait_for(client, j["id"]) for j in jobs]
    newest_first = [j["id"] for j in reversed(jobs)]

    def listed(d: WebDriver) -> list[str]:  # in one call: the list is redrawn as it loads
        return d.execute_script("return [...document.querySelectorAll("
                                "'#history-list .history-item')].map((e) => e.title);")

    page.execute_script("document.getElementById('history-list').dataset.pageSize = '2'")
    button(page, "Refresh").click()
    wait(page, 10).until(lambda d: listed(d) == newest_first[:2])
    button(page, "Older").click()
    wait(page, 10).until(lambda d: listed(d)[:1] == newest_first[2:])
    button(page, "Newer").click()
    wait(page, 10).until(lambda d: listed(d) == newest_first[:2])
    assert not button(page, "Newer").is_enabled()

    page.find_element(By.CSS_SELECTOR, f"[title='{jobs[1]['id']}']").click()
    [image] = wait(page, 10).until(lambda d: d.find_elements(By.XPATH, GENERATED))
    assert image.get_attribute("alt") == f"Generated image 1 (seed {done[1]['result']['seed']})"
    assert image.get_attribute("src") == done[1]["result"]["images"][0]


def test_event_stream_parser_handles_any_chunk_boundary(page) -> None:
    stream = (": ping\r\n\r\nevent: job\r\ndata: {\"a\": \"é→\"}\r\nid: 7\r\n\r\n"
              "data: one\ndata:two\n\n: comment\nevent: other\ndata: x\n\n"
              "event: job\rdata: {}\r\rdata: unfinished")
    expected = [{"event": "job", "data": '{"a": "é→"}', "id": "7"},
                {"event": "message", "data": "one\ntwo", "id": "7"},
                {"event": "other", "data": "x", "id": "7"},
                {"event": "job", "data": "{}", "id": "7"}]
    for size in (1, 2, 3, 5, len(stream.encode())):
        events = page.execute_async_script("""
            const [text, size, done] = arguments;
            import('./playground/sse.js').then(async ({ parseEventStream }) => {
              const bytes = new TextEncoder().encode(text);
              const body = new ReadableStream({ start(c) {
                for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
                c.close();
              } });
              const out = [];
              for await (const ev of parseEventStream(body)) out.push(ev);
              done(out);
            }).catch((err) => done(String(err)));
        """, stream, size)
        assert events == expected, size


def gradient() -> Image.Image:
    image = Image.new("RGB", (128, 96))
    image.putdata([(x * 2, y * 2, 128) for y in range(96) for x in range(128)])
    return image


def test_the_hires_toggle_makes_a_text2img_twice_the_size(page, client) -> None:
    fill(page, prompt="a lake, larger")
    fill(page, width=96, height=64, steps=3, seed=77, number_of_images=1)
    assert not control(page, "Hires scale").is_displayed()  # off: its options hidden
    control(page, "Hires fix").click()
    fill(page, hires_steps=4)
    Select(control(page, "Hires upscaler")).select_by_value("lanczos")
    [image] = generate(page)
    width = page.execute_script("return arguments[0].naturalWidth", image)
    height = page.execute_script("return arguments[0].naturalHeight", image)
    assert (width, height) == (192, 128)
    record = client.get(f"/jobs/{job_id(page)}").json()
    assert record["request"]["hires"] == {"scale": 2, "width": 192, "height": 128,
                                          "upscaler": "lanczos", "steps": 4,
                                          "denoisingStrength": 0.7, "sampler": "ddim"}
