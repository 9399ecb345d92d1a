"""Make the README's pictures of the page: one per mode, on the demo model, in headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Starts the app (``--demo``, a temporary data folder with two demo LoRAs), drives each tab as a person
would (upload, paint, pick LoRAs, Generate) and saves a PNG per mode. Needs Chromium (``scripts/install.sh
--dev`` installs Debian's package) and Playwright.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VIEWPORT = {"width": 1400, "height": 1200}


def _sample_images(folder: Path) -> dict[str, Path]:
    """An input photo stand-in (a gradient with a disc) and a control image (its edges)."""
    from PIL import Image, ImageDraw, ImageFilter

    photo = Image.linear_gradient("L").resize((512, 512)).convert("RGB")
    ImageDraw.Draw(photo).ellipse((140, 140, 372, 372), fill=(220, 120, 40))
    edges = photo.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 20 else 0).convert("RGB")
    paths = {"photo": folder / "photo.png", "edges": folder / "edges.png"}
    photo.save(paths["photo"])
    edges.save(paths["edges"])
    return paths


def _paint(page, editor_id: str) -> None:
    canvas = page.locator(f"#{editor_id} canvas").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 60, y - 40)
    page.mouse.down()
    for step in range(20):
        page.mouse.move(x - 60 + 6 * step, y - 40 + 4 * step)
    page.mouse.up()


def _generate(page, button_id: str) -> None:
    page.locator(f"#{button_id}").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Seed')", timeout=180_000)
    page.wait_for_timeout(800)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="Folder for the PNGs.")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    from servers import start_server
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zimage-screens-"))
    try:
        lora_dir = work / "loras"
        lora_dir.mkdir()
        for name, fmt, seed in (("watercolor", "peft", 1), ("ink-sketch", "kohya", 2)):
            subprocess.run([sys.executable, "-m", "zimage", "make-demo-lora", str(lora_dir / f"{name}.safetensors"),
                            "--format", fmt, "--seed", str(seed)], cwd=ROOT, check=True)
        images = _sample_images(work)
        server = start_server(work, work / "data", "--lora-dir", str(lora_dir))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(server.url, wait_until="domcontentloaded")
                page.locator("#prompt textarea").wait_for(timeout=60_000)
                page.locator("#prompt textarea").fill("一只橘猫坐在窗台上 an orange cat on a windowsill")
                page.get_by_label("Size").click()
                page.get_by_role("option", name="1:1 small and fast, 512x512").click()
                _generate(page, "generate")
                page.screenshot(path=str(args.out / "text-to-image.png"), full_page=True)

                page.get_by_role("tab", name="Image to image").click()
                page.locator("#img2img-image input[type=file]").set_input_files(str(images["photo"]))
                page.wait_for_timeout(1000)
                _generate(page, "generate-img2img")
                page.screenshot(path=str(args.out / "image-to-image.png"), full_page=True)

                page.get_by_role("tab", name="Inpainting").click()
                page.locator("#inpaint-editor input[type=file]").set_input_files(str(images["photo"]))
                page.wait_for_timeout(1500)
                _paint(page, "inpaint-editor")
                _generate(page, "generate-inpaint")
                page.screenshot(path=str(args.out / "inpainting.png"), full_page=True)

                page.get_by_role("tab", name="ControlNet").click()
                page.locator("#control-image input[type=file]").set_input_files(str(images["edges"]))
                page.wait_for_timeout(1000)
                _generate(page, "generate-controlnet")
                page.screenshot(path=str(args.out / "controlnet.png"), full_page=True)

                page.get_by_role("tab", name="Text to image").click()
                for index, name in enumerate(("watercolor", "ink-sketch")):
                    page.locator(f"#lora-{index} input").click()
                    page.get_by_role("option", name=name).last.click()
                    page.keyboard.press("Escape")
                _generate(page, "generate")
                page.screenshot(path=str(args.out / "loras.png"), full_page=True)
                browser.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in sorted(args.out.glob("*.png")):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
