"""The web page in a real headless Chromium: real photos and a broken file in, captions and the
error rendered, a screenshot that is not blank, a phone-width layout, labels for every control."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tests.serving import fill, load, serve, tiny_decoder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian package `chromium`: apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    folder = shared_path("data", "coco", "images")
    return sorted(folder.glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def captioner(tiny_clip_dir, tmp_path_factory):
    from ragcap.embed import load_embedder
    from ragcap.store import open_store

    coco = json.loads(shared_path("data", "coco", "captions_val2014_by_image.json").read_text())
    captions = [c for caps in list(coco.values())[:100] for c in caps]
    embedder = load_embedder(str(tiny_clip_dir))
    store = open_store(memory=True)
    fill(store, embedder, captions)
    yield load(store, tiny_clip_dir, tiny_decoder(tmp_path_factory.mktemp("decoder"), embedder))
    store.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    yield page
    page.close()


def wait_done(page) -> None:
    # A locator wait: the page's Content-Security-Policy (kept on in these tests) forbids the
    # string evaluation that wait_for_function uses.
    page.locator("#status", has_text="Done").wait_for(timeout=120_000)


def assert_not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 10 and colours > 500, f"{path} looks blank ({colours} colours, std {pixels.std():.1f})"


def expected_captions(captioner, photo: Path, neighbours: int) -> dict:
    from dataclasses import replace

    run = captioner.with_settings(replace(captioner.settings, neighbours=neighbours))
    results = list(run.caption_images([photo.read_bytes()]))
    return {r.mode: r.caption for r in results}, [c for c, _ in results[0].neighbours]


def test_page_captions_real_photos_and_shows_the_broken_files_error(page, captioner, photos, tmp_path):
    running = serve(captioner)
    try:
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(photos[2].read_bytes()[:3000])  # a real photo, cut short
        page.goto(running.url + "/")
        page.wait_for_selector('input[name="mode"]')
        assert page.locator('input[name="mode"]:checked').evaluate_all("boxes => boxes.map(b => b.value)") == ["pd", "clipre"]
        page.fill("#neighbours", "3")
        page.set_input_files("#files", [str(photos[0]), str(broken), str(photos[1])])
        wait_done(page)
        assert page.text_content("#status").endswith("2 captioned, 1 failed.")

        cards = page.locator("article.card")
        assert cards.count() == 3
        for i, photo in ((0, photos[0]), (2, photos[1])):
            card = cards.nth(i)
            assert card.locator("h2").text_content() == photo.name
            want, neighbours = expected_captions(captioner, photo, 3)
            shown = {dd.get_attribute("data-mode"): dd.text_content() for dd in card.locator("dd.caption").all()}
            assert shown == want
            assert card.locator("ol.neighbours .neighbour").all_text_contents() == neighbours
            scores = [float(s) for s in card.locator("ol.neighbours .score").all_text_contents()]
            assert scores == sorted(scores, reverse=True)
            assert "ms" in card.locator(".timing").text_content()
            assert card.locator("img").evaluate("img => img.naturalWidth") > 0  # the photo itself is shown
        error = cards.nth(1).locator(".error")
        assert error.get_attribute("role") == "alert"
        assert error.text_content().startswith("broken.jpg: corrupt or truncated image")
        assert cards.nth(1).locator("dd.caption").count() == 0

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert_not_blank(shot)

        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input, button')].filter(e => !e.labels?.length && !e.textContent.trim()"
            " && e.type !== 'hidden').map(e => e.id || e.name)")
        assert unlabelled == []

        page.set_viewport_size({"width": 375, "height": 800})  # a phone
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.locator("article.card").first.bounding_box()["width"] <= 375
        phone = tmp_path / "phone.png"
        page.screenshot(path=str(phone), full_page=True)
        assert_not_blank(phone)
        print(f"screenshots: {shot} {phone}")
    finally:
        running.stop()


def test_dropping_a_photo_captions_it(page, captioner, photos):
    running = serve(captioner)
    try:
        page.goto(running.url + "/")
        page.wait_for_selector('input[name="mode"]')
        data = base64.b64encode(photos[2].read_bytes()).decode()
        transfer = page.evaluate_handle(
            """([data, name]) => {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
                return transfer;
            }""", [data, photos[2].name])
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        wait_done(page)
        want, _ = expected_captions(captioner, photos[2], 5)
        shown = {dd.get_attribute("data-mode"): dd.text_content() for dd in page.locator("dd.caption").all()}
        assert shown == want
    finally:
        running.stop()


def test_page_asks_for_the_api_key_and_uses_it(page, captioner, photos):
    running = serve(captioner, api_key="let-me-in")
    try:
        page.goto(running.url + "/")
        page.wait_for_selector("#key-field:not([hidden])")
        assert "API key" in page.text_content("#status")
        page.fill("#api-key", "let-me-in")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector('input[name="mode"]')
        page.set_input_files("#files", [str(photos[0])])
        wait_done(page)
        assert page.locator("dd.caption").count() == 2 and page.locator(".error").count() == 0
    finally:
        running.stop()
