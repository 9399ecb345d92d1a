"""A person's path through the page, in headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from servers import ROOT, start_server

pytestmark = [pytest.mark.server, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Without the background-networking flags Chromium keeps trying to reach Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/install.sh --dev (apt package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("browser-server"), data_dir)
    yield srv
    assert srv.stop() == 0


def open_page(page, server) -> None:
    # Not "networkidle": Gradio keeps connections open, so the network never goes quiet.
    page.goto(server.url, wait_until="domcontentloaded")
    page.locator("#prompt textarea").wait_for(timeout=60_000)


def test_type_generate_watch_progress_get_the_image(browser, server) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_page(page, server)
    assert "Demo model loaded" in page.locator("#demo-banner").inner_text()
    page.locator("#prompt textarea").fill("一只橘猫坐在窗台上 an orange cat on a windowsill")
    # Record whether a progress indicator ever appears, however briefly.
    page.evaluate("""() => {
        window.__sawProgress = false;
        new MutationObserver(() => {
            if (document.body.innerText.includes('Denoising step')) window.__sawProgress = true;
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_role("button", name="Generate", exact=True).click()
    # An SVG icon can be large too: wait for a raster image drawn large in the result gallery.
    page.wait_for_function("""() => [...document.querySelectorAll('#result img')].some(
        img => img.complete && img.naturalWidth >= 1024 && img.getBoundingClientRect().width > 100)""",
                           timeout=120_000)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Seed')", timeout=30_000)
    assert page.evaluate("window.__sawProgress")
    status = page.locator("#status").inner_text()
    assert "1024x1024" in status and server.health()[1]["profile"] in status
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)
    page.close()


def test_invalid_custom_size_shows_a_readable_error(browser, server) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_page(page, server)
    page.locator("#prompt textarea").fill("a cat")
    page.get_by_label("Size").click()
    page.get_by_role("option", name="Custom").click()
    width = page.get_by_label("Width")
    width.fill("1000")
    width.press("Tab")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.body.innerText.includes('is not a multiple of 16')", timeout=60_000)
    assert "Traceback" not in page.content()
    # Nothing runs, so there is nothing to cancel.
    page.wait_for_function("() => document.querySelector('#cancel').disabled", timeout=30_000)
    page.wait_for_timeout(600)  # let the toast finish fading in before the screenshot
    page.screenshot(path=str(ARTIFACTS / "browser-invalid-size.png"), full_page=True)
    page.close()


def test_a_queued_job_shows_its_place_in_the_queue(browser, server, tmp_path: Path) -> None:
    from gradio_client import Client

    # Another client's job holds the GPU: ours waits in the service's queue.
    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    others = [client.submit("a long job", 1024, 1024, 16, 1, 1, api_name="/generate")]
    while not all(other.status().progress_data for other in others):
        time.sleep(0.05)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_page(page, server)
    page.locator("#prompt textarea").fill("queued behind another job")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelector('#result').innerText.includes('Queued: position 1 of 1')",
                           timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-queued.png"))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Seed')", timeout=180_000)
    assert all(other.done() for other in others)  # ours ran after the others, one job at a time
    page.close()


def test_cancel_stops_the_running_job_and_frees_the_gpu(browser, server) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_page(page, server)
    page.locator("#prompt textarea").fill("a job to cancel")
    page.get_by_label("Steps").first.fill("50")
    page.get_by_label("Steps").first.press("Tab")
    cancel = page.get_by_role("button", name="Cancel", exact=True)
    assert cancel.is_disabled()  # nothing to cancel yet
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelector('#result').innerText.includes('Denoising step')",
                           timeout=60_000)
    assert cancel.is_enabled()
    cancel.click()
    cancelled = time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.health()[1]["busy"]:
        time.sleep(0.02)
    assert not server.health()[1]["busy"]
    print(f"\n[browser] Cancel -> pipeline free after {time.monotonic() - cancelled:.2f} s")
    # The service stopped at a step boundary, long before the 50 steps, and never decoded.
    record = [json.loads(line) for line in server.log().splitlines() if '"outcome": "cancelled"' in line][-1]
    assert record["stage"] == "denoising" and record["step"] < 50
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Cancelled')", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#cancel').disabled", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-cancelled.png"))
    page.close()


def _saved_metadata(server, request_id_hint: str | None = None) -> dict:
    """The metadata of the newest PNG the server saved."""
    from zimage.storage import read_metadata

    newest = max(server.outputs.rglob("*.png"), key=lambda path: path.stat().st_mtime)
    return read_metadata(newest)


def _wait_for_size(page, width: int, height: int) -> None:
    page.wait_for_function(f"""() => {{
        const values = [...document.querySelectorAll('input[type=number]')].map(e => e.value);
        return values.includes('{width}') && values.includes('{height}');
    }}""", timeout=30_000)


def _wait_for_result(page, width: int, height: int) -> None:
    page.wait_for_function(f"""() => [...document.querySelectorAll('#result img')].some(
        img => img.complete && img.naturalWidth === {width} && img.naturalHeight === {height})""", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Seed')", timeout=30_000)


def test_image_to_image_upload_generate_then_use_the_result_as_input(browser, server, tmp_path: Path) -> None:
    import hashlib

    from PIL import Image

    source = tmp_path / "photo.png"
    Image.new("RGB", (330, 250), (200, 40, 40)).save(source)  # sides that are not multiples of 16
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    open_page(page, server)
    page.locator("#prompt textarea").fill("a red barn")
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#generate").wait_for(state="hidden", timeout=30_000)  # only the selected mode's Generate shows
    page.locator("#img2img-image input[type=file]").set_input_files(str(source))
    _wait_for_size(page, 336, 256)  # the size follows the upload: the nearest multiples of 16
    page.locator("#generate-img2img").click()
    _wait_for_result(page, 336, 256)
    meta = _saved_metadata(server)
    assert meta["mode"] == "img2img" and meta["strength"] == 0.6 and (meta["width"], meta["height"]) == (336, 256)
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    page.screenshot(path=str(ARTIFACTS / "browser-img2img.png"), full_page=True)
    # "Use as input" puts the result into image-to-image: the next job starts from it.
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#use-as-input").click()
    page.locator("#generate-img2img").wait_for(state="visible", timeout=30_000)
    assert page.get_by_role("tab", name="Image to image").get_attribute("aria-selected") == "true"
    page.locator("#img2img-image img").first.wait_for(timeout=30_000)
    page.locator("#generate-img2img").click()
    page.wait_for_function("() => document.querySelectorAll('#history img').length >= 2", timeout=120_000)
    second = _saved_metadata(server)
    assert second["mode"] == "img2img" and second["inputs"][0]["sha256"] != meta["inputs"][0]["sha256"]
    page.close()


def test_inpainting_upload_paint_a_mask_generate(browser, server, tmp_path: Path) -> None:
    from PIL import Image

    source = tmp_path / "room.png"
    Image.new("RGB", (320, 256), (30, 60, 200)).save(source)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    open_page(page, server)
    page.locator("#prompt textarea").fill("a window in the wall")
    page.get_by_role("tab", name="Inpainting").click()
    # Gradio's editor drops a file given before its canvas is drawn (slow on a loaded 2-core machine, where
    # Chromium renders WebGL in software): wait for the canvas, as a person waits to see the editor.
    page.locator("#inpaint-editor canvas").first.wait_for(timeout=60_000)
    page.locator("#inpaint-editor input[type=file]").set_input_files(str(source))
    _wait_for_size(page, 320, 256)  # the size follows the uploaded image
    canvas = page.locator("#inpaint-editor canvas").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 50, y - 30)
    page.mouse.down()
    for step in range(15):  # a brush stroke across the middle
        page.mouse.move(x - 50 + 7 * step, y - 30 + 4 * step)
    page.mouse.up()
    page.locator("#generate-inpaint").click()
    _wait_for_result(page, 320, 256)
    meta = _saved_metadata(server)
    assert meta["mode"] == "inpaint" and meta["strength"] == 1.0
    # The editor sends its canvas' background as its own PNG, and the strokes as a layer: the mask.
    assert len(meta["inputs"]) == 2 and meta["inputs"][1]["name"] == "painted mask"
    page.screenshot(path=str(ARTIFACTS / "browser-inpaint.png"), full_page=True)
    page.close()


def test_dropping_a_png_made_here_fills_the_form(browser, server, tmp_path: Path) -> None:
    from gradio_client import Client

    Client(server.url, verbose=False, download_files=str(tmp_path)).predict(
        "a lighthouse at dawn", 272, 256, 3, 4242, 1, api_name="/generate")
    made = max(server.outputs.rglob("*.png"), key=lambda path: path.stat().st_mtime)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    open_page(page, server)
    page.get_by_text("Reuse the settings of an image made here").click()
    page.locator("#png-drop input[type=file]").set_input_files(str(made))
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a lighthouse at dawn'",
                           timeout=30_000)
    values = page.locator("input[type=number]").evaluate_all("els => els.map(e => e.value)")
    assert {"272", "256", "3", "4242"} <= set(values)
    page.close()
