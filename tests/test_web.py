"""The web page end to end: Debian's chromium, driven by Playwright, against uvicorn on loopback."""

from pathlib import Path

import pytest

from ctl.index import CatalogIndex, IndexedRecommender
from ctl.serve import create_app, pick_examples

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing: pip install playwright")

LOADED = "img => img.complete && img.naturalWidth > 0"


@pytest.fixture(scope="module")
def page_url(catalog_run, live_server):
    index = CatalogIndex.load(catalog_run.index_dir, catalog_run.run)
    examples = pick_examples(catalog_run.dataset, list(index.categories), 3, catalog_run.run.config.data)
    app = create_app(IndexedRecommender(catalog_run.run, catalog_run.backbone, index), examples)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(page_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(page_url)
        page.wait_for_selector("#category option", state="attached")
        yield page
        browser.close()


def results(page, count: int) -> list[float]:
    page.locator("#results .product").nth(count - 1).wait_for()
    cards = page.locator("#results .product")
    assert cards.count() == count
    for image in cards.locator("img").all():
        image.scroll_into_view_if_needed()
        page.wait_for_function(LOADED, arg=image.element_handle())
    return [float(text.split("d = ")[1]) for text in cards.locator(".distance").all_text_contents()]


def test_upload_draw_a_box_and_recommend(page, catalog_run):
    query = catalog_run.dataset.queries[0]
    page.set_input_files("#upload", str(catalog_run.dataset.image_path(query.scene)))
    page.wait_for_selector("#placeholder", state="hidden")
    frame = page.locator("#scene").bounding_box()
    page.mouse.move(frame["x"] + 0.2 * frame["width"], frame["y"] + 0.3 * frame["height"])
    page.mouse.down()
    page.mouse.move(frame["x"] + 0.6 * frame["width"], frame["y"] + 0.7 * frame["height"], steps=5)
    page.mouse.up()
    assert page.text_content("#box-text").startswith("Box: 0.2")
    page.select_option("#category", query.category)
    page.fill("#k", "4")
    with page.expect_response("**/v1/recommend") as response:
        page.click("#go")
    sent = response.value.json()
    assert sent["category"] == query.category
    assert sent["box"] == pytest.approx([0.2, 0.3, 0.6, 0.7], abs=0.02)
    distances = results(page, 4)
    assert distances == sorted(distances)
    assert distances == pytest.approx([p["distance"] for p in sent["products"]], abs=1e-4)
    page.wait_for_function(LOADED, arg=page.locator("#attention").element_handle())
    assert page.text_content("#status").startswith("Top 4")


def test_example_scene_with_its_box(page):
    page.locator("#examples button").first.click()
    page.wait_for_function("() => document.getElementById('box-text').textContent.startsWith('Box: 0')")
    page.click("#clear-box")
    assert "none" in page.text_content("#box-text")
    page.fill("#k", "3")
    with page.expect_response("**/v1/recommend") as response:
        page.click("#go")
    assert response.value.json()["box"] is None
    results(page, 3)


def test_a_refusal_is_shown(page):
    page.fill("#k", "100")
    page.evaluate("() => { const o = new Option('Nope', 'Nope'); document.getElementById('category').add(o); }")
    page.select_option("#category", "Nope")
    page.click("#go")
    page.wait_for_selector("#status.error")
    assert "422: unknown category 'Nope'" in page.text_content("#status")
