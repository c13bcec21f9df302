"""The inspection page in a real browser: `flawscope serve` on loopback, headless Chromium.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``) or any Chromium/Chrome
named by ``FLAWSCOPE_CHROMIUM``; Playwright's own browser download is not used. Set
``FLAWSCOPE_SCREENSHOTS=DIR`` to keep screenshots of the page.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from flawscope.data.dataset import open_dataset
from flawscope.pipeline import Inspector

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 2, "progress": False, "device": "cpu"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    candidates = [os.environ.get("FLAWSCOPE_CHROMIUM"), "/usr/bin/chromium",
                  *(shutil.which(n) for n in ("chromium", "chromium-browser",
                                              "google-chrome", "google-chrome-stable"))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (looked at $FLAWSCOPE_CHROMIUM, /usr/bin/chromium and "
                    "chromium/google-chrome on PATH); install it: apt-get install -y chromium")
    return path


@pytest.fixture(scope="module")
def station(synthetic_root, tmp_path_factory):
    """A trained model, a good and a defect image it judges as such, and its verdicts."""
    root = synthetic_root / "tile"
    inspector = Inspector.train(open_dataset(root), "ncae", **TINY)
    model = inspector.save(tmp_path_factory.mktemp("browser") / "tile.safetensors")
    goods = sorted((root / "test" / "good").glob("*.png"))
    defects = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")
    good = min(inspector.predict(goods), key=lambda p: p.score)
    defect = max(inspector.predict(defects), key=lambda p: p.score)
    assert good.verdict == "ok" and defect.verdict == "defect", "model too weak for the test"
    return model, Path(good.path), Path(defect.path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(station, tmp_path_factory):
    """``flawscope serve`` in a subprocess on a free loopback port; yields its base URL."""
    import httpx

    model = station[0]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    db = tmp_path_factory.mktemp("browser-records") / "records.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flawscope", "serve", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--log-level", "warning", "--db", str(db)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flawscope serve exited with {proc.returncode}: "
                            f"{proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("flawscope serve did not answer /healthz within 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def page(chromium, server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 760})
            # Playwright subscribes to response events asynchronously, on the first listener:
            # subscribe now so that a later expect_response cannot miss a fast answer
            pg.on("response", lambda _: None)
            pg.goto(server + "/")
            pg.wait_for_function(
                "() => document.querySelector('#model-info').textContent.includes('ncae')")
            yield pg
        finally:
            browser.close()


def _wait_done(page, n: int) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('#results .card').length === {n} && "
        "!document.querySelector('#results .card.pending')", timeout=60_000)


def _cards(page) -> dict[str, tuple[str, str]]:
    rows = page.eval_on_selector_all(
        "#results .card",
        "cs => cs.map(c => [c.dataset.file, c.dataset.verdict, "
        "c.querySelector('.badge').textContent])")
    return {name: (verdict, badge) for name, verdict, badge in rows}


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.wait_for_timeout(300)  # let the score bars finish their transition
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("FLAWSCOPE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


def _upload(page, paths) -> list[dict]:
    """Choose ``paths`` in the file input; wait for the verdicts; the service's results."""
    with page.expect_response("**/v1/predict") as response:
        page.set_input_files("#file-input", [str(p) for p in paths])
    _wait_done(page, len(paths))
    return response.value.json()["results"]


def _box(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not rendered"
    return box


def test_upload_good_and_defect_through_file_picker(page, station, tmp_path):
    _, good, defect = station
    results = _upload(page, [good, defect])
    cards = _cards(page)
    assert cards[good.name] == ("ok", "OK")
    assert cards[defect.name] == ("defect", "DEFECT")
    assert page.text_content("#summary").strip() == "1 of 2 passed · 1 defect"
    heat_sizes = page.eval_on_selector_all(
        "#results .card .heat", "hs => hs.map(h => [h.hidden, h.naturalWidth])")
    assert heat_sizes == [[False, 32], [False, 32]]
    nums = page.text_content(f"#results .card[data-file='{defect.name}'] .nums")
    assert "> threshold" in nums
    # region boxes and text only where the service sends regions (older services do not)
    for res in results:
        card = f"#results .card[data-file='{res['file']}']"
        rects = page.locator(f"{card} svg.regions rect").count()
        assert rects == len(res.get("regions") or [])
        assert page.locator(f"{card} .region-text").is_visible() == ("regions" in res)
    _screenshot(page, tmp_path, "inspection-page.png")


def test_drop_with_an_unreadable_file(page, station, tmp_path):
    _, good, defect = station
    files = [(good.name, good.read_bytes()), ("notes.png", b"not an image"),
             (defect.name, defect.read_bytes())]
    page.evaluate(
        """files => {
            const dt = new DataTransfer();
            for (const [name, b64] of files) {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                dt.items.add(new File([bytes], name, {type: 'image/png'}));
            }
            const drop = document.querySelector('#drop');
            drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                      cancelable: true}));
        }""",
        [[name, base64.b64encode(data).decode()] for name, data in files],
    )
    _wait_done(page, 3)
    cards = _cards(page)
    assert cards[good.name][0] == "ok" and cards[defect.name][0] == "defect"
    assert cards["notes.png"][0] == "error"
    assert "not an image" in page.text_content("#results .card[data-file='notes.png'] .nums")
    assert page.text_content("#summary").strip() == "1 of 2 passed · 1 defect · 1 unreadable"
    _screenshot(page, tmp_path, "inspection-page-drop.png")
    page.click("#clear")
    assert page.text_content("#summary").strip() == "No images inspected yet."


def test_phone_width_has_no_horizontal_scroll(page, station, tmp_path):
    _, good, defect = station
    long_name = tmp_path / ("line-3_camera-2_station-0007_part-000123456789_"
                            "2024-05-17T08-31-12_front-left.png")
    shutil.copy(good, long_name)
    page.set_viewport_size({"width": 360, "height": 740})
    _upload(page, [long_name, defect])
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for sel in ("#choose", "#show-heatmap", "#opacity", "#filter", "#download", "#clear",
                "#legend", "#results .card .frame"):
        assert page.locator(sel).first.is_visible(), sel
        box = _box(page, sel)
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (sel, box)
    _screenshot(page, tmp_path, "inspection-page-phone.png")


def test_keyboard_choose_files_and_announced_results(page, station):
    _, good, _ = station
    assert page.get_by_role("button", name="Choose images").count() == 1
    # subscribed early: Playwright turns on file-chooser interception asynchronously
    page.on("filechooser", lambda chooser: chooser.set_files(str(good)))
    focused = []
    for _ in range(6):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
        if focused[-1] == "choose":
            break
    assert focused[-1] == "choose" and "file-input" not in focused, focused
    outline = page.evaluate("""() => {
        const s = getComputedStyle(document.activeElement);
        return [s.outlineStyle, parseFloat(s.outlineWidth)]; }""")
    assert outline[0] != "none" and outline[1] >= 2, outline
    page.keyboard.press("Enter")  # opens the file chooser, answered by the handler above
    _wait_done(page, 1)
    assert page.get_attribute("#summary", "role") == "status"
    assert page.text_content("#summary").strip() == "1 of 1 passed · 0 defects"
    card = page.get_by_role("article", name=good.name)
    assert card.get_attribute("data-verdict") == "ok" and card.get_attribute("aria-busy") is None
    assert page.get_by_role("button", name=f"Enlarge {good.name}").count() == 1


def test_non_square_image_keeps_its_aspect_ratio(page, station, tmp_path):
    _, _, defect = station
    wide = tmp_path / "wide.png"
    Image.open(defect).resize((150, 50)).save(wide)
    (res,) = _upload(page, [wide])
    assert (res["width"], res["height"]) == (150, 50)
    photo, heat = _box(page, ".card .photo"), _box(page, ".card .heat")
    assert photo["width"] / photo["height"] == pytest.approx(3, rel=0.03)
    for k in ("x", "y", "width", "height"):  # the heat map lies exactly over the photo
        assert heat[k] == pytest.approx(photo[k], abs=1)


def test_legend_and_overlay_alpha(page, server):
    import httpx

    heatmap = httpx.get(server + "/v1/model").json()["heatmap"]
    legend = page.locator("#legend")
    assert legend.is_visible() and legend.get_attribute("data-colormap") == heatmap["colormap"]
    gradient = page.evaluate(
        "getComputedStyle(document.querySelector('#legend .legend-bar')).backgroundImage")
    assert gradient.startswith("linear-gradient") and "rgb(48, 18, 59)" in gradient  # turbo
    ticks = page.locator("#legend .legend-ticks span").all_text_contents()
    if heatmap["scale"] == "score":
        assert ticks == ["normal", "threshold", "2× threshold"]
    # the overlay is the PNG with its own alpha: no extra tint or opacity on top by default
    assert page.input_value("#opacity") == "100"


def test_region_boxes_over_the_image(page, server, station, tmp_path):
    import httpx

    _, _, defect = station
    wide = tmp_path / "wide-part.png"
    Image.open(defect).resize((160, 80)).save(wide)
    # the service's answer with known regions (Playwright cannot re-send a multipart body
    # holding files, so the request is made here and the browser's is answered with it)
    body = httpx.post(server + "/v1/predict",
                      files=[("files", (wide.name, wide.read_bytes(), "image/png"))]).json()
    body["results"][0].update(pixel_threshold=1.0, regions=[
        {"bbox": [0, 0, 80, 40], "area_px": 1200, "max_score": 3.0, "peak": False},
        {"bbox": [120, 60, 160, 80], "area_px": 300, "max_score": 1.5, "peak": True}])
    page.route("**/v1/predict", lambda route: route.fulfill(json=body))
    _upload(page, [wide])
    photo = _box(page, ".card .photo")
    rects = page.locator(".card svg.regions rect")
    assert rects.count() == 2
    first, second = rects.nth(0).bounding_box(), rects.nth(1).bounding_box()
    # bbox in original pixels: the first is the top-left quarter of the shown image
    assert first["x"] == pytest.approx(photo["x"], abs=2)
    assert first["width"] == pytest.approx(photo["width"] / 2, abs=3)
    assert first["height"] == pytest.approx(photo["height"] / 2, abs=3)
    assert second["x"] + second["width"] == pytest.approx(photo["x"] + photo["width"], abs=2)
    assert [rects.nth(i).get_attribute("class") for i in (0, 1)] == [None, "peak"]
    assert page.text_content(".card .region-text") == \
        "2 regions · largest 1200 pixels · dashed: around the map maximum"
    _screenshot(page, tmp_path, "inspection-page-regions.png")


def test_zoom_opens_and_escape_closes(page, station, tmp_path):
    _, good, _ = station
    _upload(page, [good])
    frame = page.locator(".card .frame")
    frame.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#zoom")
    assert dialog.is_visible() and page.evaluate("document.querySelector('#zoom').open")
    assert page.text_content("#zoom-title") == good.name
    big, small = _box(page, "#zoom .photo"), _box(page, ".card .photo")
    assert big["width"] > 1.5 * small["width"]
    assert _box(page, "#zoom .heat") == pytest.approx(big, abs=1)
    assert page.evaluate("document.activeElement.id") == "zoom-close"
    _screenshot(page, tmp_path, "inspection-page-zoom.png")
    page.keyboard.press("Escape")
    assert not page.evaluate("document.querySelector('#zoom').open")
    assert page.evaluate("document.activeElement === document.querySelector('.card .frame')")
    frame.click()  # the mouse opens it too; the Close button closes it
    page.click("#zoom-close")
    assert not dialog.is_visible()


def test_download_csv_of_the_results(page, station, tmp_path):
    _, good, defect = station
    broken = tmp_path / "=broken.png"
    broken.write_bytes(b"not an image")
    assert page.is_disabled("#download")
    results = _upload(page, [good, defect])
    page.set_input_files("#file-input", [str(broken)])
    _wait_done(page, 3)
    with page.expect_download() as download:
        page.click("#download")
    assert re.fullmatch(r"flawscope-results-\d{8}-\d{6}\.csv",
                        download.value.suggested_filename)
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows[0] == ["file", "score", "normalized_score", "verdict", "regions"]
    by_name = {r[0]: r for r in rows[1:]}
    assert len(rows) == 4 and by_name["'=broken.png"][3] == "error"  # no spreadsheet formula
    for res in results:
        row = by_name[res["file"]]
        assert float(row[1]) == pytest.approx(res["score"])
        assert float(row[2]) == pytest.approx(res["normalized_score"])
        assert row[3] == res["verdict"]
        assert row[4] == ("" if "regions" not in res else str(len(res["regions"])))


def test_docs_assets_are_served_locally(server):
    import httpx

    assert httpx.get(server + "/redoc").status_code == 404  # ReDoc would need its CDN
    html = httpx.get(server + "/docs").text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)""", html)
    assert len(urls) == 4, urls  # stylesheet, icon, script, /openapi.json
    assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert not re.search(r"https?://", html)
    for u in urls:
        assert httpx.get(server + u).status_code == 200, u


def test_docs_render_offline(chromium, server):
    from urllib.parse import urlsplit

    from playwright.sync_api import sync_playwright

    outside = []

    def only_loopback(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page()
            pg.route("**/*", only_loopback)
            pg.goto(server + "/docs")
            pg.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/v1/predict']")
            assert "flawscope inspection service" in pg.text_content(".swagger-ui .title")
        finally:
            browser.close()
    assert outside == []


def test_classification_label_on_cards_and_in_csv(page, server, station):
    import httpx

    _, good, defect = station
    # a service with --classifier adds "classification" to each result (tests/
    # test_serve_classifier.py); here the page's answer gets one for the first image only
    body = httpx.post(server + "/v1/predict", files=[
        ("files", (p.name, p.read_bytes(), "image/png")) for p in (good, defect)]).json()
    assert body["results"][0].get("classification") is None  # this service has none
    body["results"][0]["classification"] = {
        "label": "tile-good", "class": "tile", "state": "good", "probability": 0.8734,
        "top": [{"label": "tile-good", "probability": 0.8734},
                {"label": "tile-crack", "probability": 0.1}]}
    page.route("**/v1/predict", lambda route: route.fulfill(json=body))
    page.set_input_files("#file-input", [str(good), str(defect)])
    _wait_done(page, 2)
    text = page.locator(f"#results .card[data-file='{good.name}'] .class-text")
    assert text.is_visible() and text.text_content() == "tile-good · 87.3%"
    assert "state good" in text.get_attribute("title")
    assert "tile-crack 10.0%" in text.get_attribute("title")
    assert not page.locator(f"#results .card[data-file='{defect.name}'] .class-text").is_visible()
    with page.expect_download() as download:
        page.click("#download")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows[0][-2:] == ["label", "label_probability"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name[good.name][-2:] == ["tile-good", "0.8734"]
    assert by_name[defect.name][-2:] == ["", ""]
