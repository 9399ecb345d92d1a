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
