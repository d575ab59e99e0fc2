"""The demo in a real browser: Playwright driving Debian's Chromium (never a downloaded browser).

Uploads an image, runs the explorer, checks that the gallery, the chart and the probe render; draws
from an example prompt and answers an example question in the multimodal tabs; saves screenshots to
``tests/artifacts/``. Skips when ``/usr/bin/chromium`` is missing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_app import shared_app  # the app process the gradio_client tests use (started once per session)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def url(tmp_path_factory, request):
    return shared_app(tmp_path_factory, request)[0]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_upload_explore_and_see_every_view(url, browser, tmp_path):
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (256, 200), (240, 240, 230))
    ImageDraw.Draw(picture).ellipse((60, 40, 190, 170), fill=(220, 30, 35))
    upload = tmp_path / "red_circle.png"
    picture.save(upload)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.locator("#evotok-input input[type=file]").set_input_files(str(upload), timeout=60_000)
    page.locator("#evotok-input img").first.wait_for(timeout=30_000)  # the upload preview
    page.locator("#evotok-labels textarea").fill("circle, red, dog")
    page.locator("#evotok-run").click()

    gallery = page.locator("#evotok-gallery img")
    gallery.first.wait_for(timeout=60_000)
    stages = gallery.count()
    assert stages >= 2
    captions = page.locator("#evotok-gallery").inner_text()
    assert "depth 1" in captions and "dB" in captions and "Lpix" in captions

    page.locator("#evotok-metrics .js-plotly-plot").wait_for(timeout=30_000)
    chart_text = page.locator("#evotok-metrics").inner_text()
    assert "PSNR" in chart_text and "cosine" in chart_text

    page.locator("#evotok-probe-plot .js-plotly-plot").wait_for(timeout=30_000)
    table = page.locator("#evotok-probe-table")
    table.get_by_text("teacher", exact=True).wait_for(timeout=30_000)
    rows = table.inner_text()
    assert all(label in rows for label in ("circle", "red", "dog"))  # top 3 of the 3 labels typed in
    page.locator("#evotok-codes .js-plotly-plot").wait_for(timeout=30_000)
    assert page.locator("#evotok-depth-view img").count() == 1  # the depth slider's large view
    assert "Computed in" in page.locator("#evotok-status").inner_text()

    # the depth slider swaps the large view to another stage
    number = page.locator("#evotok-depth input[type=number]")
    start = number.input_value()
    page.wait_for_function(f"() => document.querySelector('#evotok-depth-view').innerText.includes('depth {start} ')",
                           timeout=30_000)
    target = "2" if start != "2" else "1"
    number.fill(target)
    number.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#evotok-depth-view').innerText.includes('depth {target} ')",
                           timeout=30_000)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_clicking_an_example_runs_the_explorer(url, browser):
    examples = sorted((Path(__file__).resolve().parents[1] / "assets" / "examples").glob("*.png"))
    if not examples:
        pytest.skip("no example images in assets/examples")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.locator(".gallery-item, button.gallery").first.click(timeout=60_000)
    page.locator("#evotok-gallery img").first.wait_for(timeout=60_000)
    assert "Computed in" in page.locator("#evotok-status").inner_text()
    page.close()


def test_text_to_image_and_ask_tabs(url, browser):
    """Click an example prompt (it draws at once), then an example image + question (it answers)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.get_by_role("tab", name="Text to image").click(timeout=60_000)
    if page.locator("#evotok-prompt").count() == 0:
        pytest.skip("the app runs without a multimodal model")
    page.get_by_text("three green stars").first.click(timeout=30_000)
    page.locator("#evotok-generated-stages img").first.wait_for(timeout=120_000)
    assert page.locator("#evotok-generated img").count() == 1
    note = page.locator("#evotok-generate-note").inner_text()
    assert "three green stars" in note and "seed" in note and "nearest-neighbour" in note
    page.get_by_text("Words the model knows").click()
    assert "colours" in page.locator("#evotok-vocabulary").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "text_to_image.png"), full_page=True)

    page.get_by_role("tab", name="Ask about an image").click()
    page.locator("#evotok-ask-image").wait_for(timeout=30_000)
    example = page.get_by_text("What colour is the star?")
    if example.count() == 0:
        pytest.skip("no example image + question pairs (assets/examples)")
    example.first.click(timeout=30_000)
    page.wait_for_function("() => document.querySelector('#evotok-ask-note').innerText.includes('Answered in')",
                           timeout=120_000)
    messages = page.locator("#evotok-chat .message")
    assert messages.count() >= 2 and "What colour is the star?" in messages.first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ask.png"), full_page=True)
    assert not errors, errors
    page.close()
