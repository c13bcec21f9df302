"""The review page in headless Chromium, keyboard only: decide good / defect with one key,
move through the queue, give a defect type, the confusion counts follow; with API keys, the
key is asked for once and the reviewer is the key's owner.

Chromium as for tests/test_browser.py (``FLAWSCOPE_SCREENSHOTS=DIR`` keeps screenshots).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from test_browser import CHROMIUM_ARGS, find_chromium  # noqa: E402

from flawscope.data.dataset import open_dataset  # noqa: E402
from flawscope.pipeline import Inspector  # noqa: E402
from flawscope.threshold import Threshold  # noqa: E402
from station_support import Server  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.usefixtures("one_torch_thread")]

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 1, "progress": False, "device": "cpu"}
REVIEW_KEY = "anna-review-key-0123456789"
CAMERA_KEY = "camera-inspect-key-0123456789"


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (looked at $FLAWSCOPE_CHROMIUM, /usr/bin/chromium and "
                    "chromium/google-chrome on PATH); install it: apt-get install -y chromium")
    return path


@pytest.fixture(scope="module")
def strict_model(synthetic_root, tmp_path_factory) -> Path:
    """Every part a reject: each record has an image, a heat map and regions to review."""
    inspector = Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", **TINY)
    strict = Inspector(inspector.detector, Threshold(-1.0, "manual"), inspector.normalization,
                       inspector.info, inspector.pixel_threshold_info)
    return strict.save(tmp_path_factory.mktemp("review-model") / "strict.safetensors")


def _images(synthetic_root) -> list[Path]:
    test = synthetic_root / "tile" / "test"
    return sorted((test / "good").glob("*.png"))[:2] + sorted((test / "crack").glob("*.png"))[:2]


def _inspect(base: str, paths: list[Path], headers: dict | None = None) -> list[int]:
    r = httpx.post(base + "/v1/predict", headers=headers or {}, timeout=60,
                   files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths],
                   data={"part_id": "P-17", "station": "s-2"})
    assert r.status_code == 200, r.text
    return [x["record_id"] for x in r.json()["results"]]


@pytest.fixture(scope="module")
def open_station(strict_model, synthetic_root, tmp_path_factory):
    db = tmp_path_factory.mktemp("review-open") / "records.db"
    srv = Server(strict_model, "--db", str(db)).wait_ready()
    try:
        ids = _inspect(srv.base, _images(synthetic_root))
        yield srv, ids
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def locked_station(strict_model, synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("review-locked")
    (folder / "keys").write_text(f"anna review {REVIEW_KEY}\ncam inspect {CAMERA_KEY}\n")
    srv = Server(strict_model, "--db", str(folder / "records.db"), "--keys",
                 str(folder / "keys")).wait_ready()
    try:
        ids = _inspect(srv.base, _images(synthetic_root)[:2],
                       {"Authorization": f"Bearer {CAMERA_KEY}"})
        yield srv, ids
    finally:
        srv.stop()


@pytest.fixture
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    keep = os.environ.get("FLAWSCOPE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(keep) / name)


def _selected(page) -> str:
    return page.get_attribute("#queue [aria-selected='true']", "id") or ""


def _wait_truth(page, record_id: int, truth: str) -> None:
    page.wait_for_selector(f"#rec-{record_id}[data-truth='{truth}']", timeout=15_000)


def test_review_queue_keyboard_only(browser, open_station, tmp_path):
    srv, ids = open_station
    page = browser.new_page(viewport={"width": 1300, "height": 850})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(srv.base + "/review")
    # the queue (oldest first) and the first record with its image, heat map and regions
    page.wait_for_function("() => document.querySelector('#photo').naturalWidth > 0 && "
                           "document.querySelector('#heat').naturalWidth > 0")
    assert page.locator("#queue [role='option']").count() == 4
    assert _selected(page) == f"rec-{ids[0]}"
    assert page.evaluate("document.activeElement.id") == "queue"
    assert page.evaluate("document.querySelector('#photo').naturalWidth") == 64
    assert page.evaluate("document.querySelector('#heat').naturalWidth") == 32
    first = httpx.get(f"{srv.base}/v1/inspections/{ids[0]}").json()
    assert page.locator("#boxes rect").count() == first["n_regions"] >= 1
    assert "part P-17" in page.text_content("#record-title")
    assert "REJECT" in page.text_content("#record-meta")
    _screenshot(page, tmp_path, "review-page.png")

    page.keyboard.press("g")  # no reviewer name yet: the page asks for it
    assert page.evaluate("document.activeElement.id") == "reviewer"
    page.keyboard.type("Ann")
    page.keyboard.press("Enter")  # ... and then records the decision
    _wait_truth(page, ids[0], "good")
    page.wait_for_function(f"() => document.querySelector(\"#queue [aria-selected='true']\")"
                           f".id === 'rec-{ids[1]}'")
    page.keyboard.press("t")  # defect type, Enter: a defect of that type
    assert page.evaluate("document.activeElement.id") == "defect-type"
    page.keyboard.type("crack")
    page.keyboard.press("Enter")
    _wait_truth(page, ids[1], "defect")
    page.keyboard.press("j")  # skip the third, come back to it, call it a defect
    page.wait_for_function(f"() => document.querySelector(\"#queue [aria-selected='true']\")"
                           f".id === 'rec-{ids[3]}'")
    page.keyboard.press("k")
    assert _selected(page) == f"rec-{ids[2]}"
    page.keyboard.press("n")
    page.keyboard.type("burr at the edge")
    page.keyboard.press("Escape")
    page.keyboard.press("d")
    _wait_truth(page, ids[2], "defect")
    page.wait_for_function(
        "() => document.querySelector(\"[data-cell='reject-defect']\").textContent === '2'")
    assert page.text_content("[data-cell='reject-good']") == "1"
    assert page.text_content("[data-cell='pass-good']") == "0"
    assert "1 of 3" in page.text_content("[data-rate='false_reject_share']")
    assert "CI" in page.text_content("[data-rate='false_reject_share']")
    _screenshot(page, tmp_path, "review-page-decided.png")
    records = {i: httpx.get(f"{srv.base}/v1/inspections/{i}").json() for i in ids}
    assert [(records[i]["truth"], records[i]["reviewer"]) for i in ids] == [
        ("good", "Ann"), ("defect", "Ann"), ("defect", "Ann"), (None, None)]
    assert records[ids[1]]["defect_type"] == "crack" and records[ids[2]]["defect_type"] is None
    assert records[ids[2]]["reviews"][0]["note"] == "burr at the edge"
    assert errors == []


def test_review_page_asks_for_the_api_key(browser, locked_station):
    srv, ids = locked_station
    page = browser.new_page(viewport={"width": 1300, "height": 850})
    page.goto(srv.base + "/review")
    page.wait_for_selector("#key-dialog[open]")
    assert page.evaluate("document.activeElement.id") == "key-input"
    page.keyboard.type(REVIEW_KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#photo').naturalWidth > 0")
    assert page.locator("#queue [role='option']").count() == 2
    page.keyboard.press("d")  # the reviewer is the key's owner: no name asked
    _wait_truth(page, ids[0], "defect")
    rec = httpx.get(f"{srv.base}/v1/inspections/{ids[0]}",
                    headers={"X-API-Key": REVIEW_KEY}).json()
    assert (rec["truth"], rec["reviewer"], rec["reviews"][0]["api_key"]) == (
        "defect", "anna", "anna")
    # the key is kept for the tab only, never in the page's URL or storage that persists
    assert REVIEW_KEY not in page.url
    assert page.evaluate("JSON.stringify(localStorage)").find(REVIEW_KEY) < 0
