"""The inspection page in a real browser: `flawscope serve` on loopback, headless Chromium.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``) or any Chromium/Chrome
named by ``FLAWSCOPE_CHROMIUM``; Playwright's own browser download is not used. Set
``FLAWSCOPE_SCREENSHOTS=DIR`` to keep screenshots of the page.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flawscope.data.dataset import open_dataset
from flawscope.pipeline import Inspector

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
def server(station):
    """``flawscope serve`` in a subprocess on a free loopback port; yields its base URL."""
    import httpx

    model = station[0]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flawscope", "serve", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--log-level", "warning"],
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


def test_upload_good_and_defect_through_file_picker(page, station, tmp_path):
    _, good, defect = station
    page.set_input_files("#file-input", [str(good), str(defect)])
    _wait_done(page, 2)
    cards = _cards(page)
    assert cards[good.name] == ("ok", "OK")
    assert cards[defect.name] == ("defect", "DEFECT")
    assert page.text_content("#summary").strip() == "1 of 2 passed · 1 defect"
    heat_sizes = page.eval_on_selector_all(
        "#results .card .heat", "hs => hs.map(h => [h.hidden, h.naturalWidth])")
    assert heat_sizes == [[False, 32], [False, 32]]
    nums = page.text_content(f"#results .card[data-file='{defect.name}'] .nums")
    assert "> threshold" in nums
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
