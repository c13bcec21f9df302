"""The inspection service: API contract, heatmaps, limits and errors, concurrency."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import write_png  # noqa: E402
from flawscope.cli import main  # noqa: E402
from flawscope.data.dataset import open_dataset  # noqa: E402
from flawscope.data.images import read_image  # noqa: E402
from flawscope.errors import ConfigError  # noqa: E402
from flawscope.heatmap import colormap_lut, heatmap_rgba, scale_map  # noqa: E402
from flawscope.pipeline import Inspector  # noqa: E402
from flawscope.serve import create_app  # noqa: E402
from flawscope.serve.app import decode_upload  # noqa: E402
from flawscope.threshold import ScoreNormalization  # noqa: E402

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 2, "progress": False, "device": "cpu"}
LIMIT_BYTES = 300_000
LIMIT_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def inspector(synthetic_root) -> Inspector:
    return Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", **TINY)


@pytest.fixture(scope="module")
def model_path(inspector, tmp_path_factory) -> Path:
    return inspector.save(tmp_path_factory.mktemp("serve") / "tile.safetensors")


@pytest.fixture(scope="module")
def client(model_path):
    app = create_app(model_path, max_upload_bytes=LIMIT_BYTES, max_pixels=LIMIT_PIXELS,
                     max_files=8, workers=2, device="cpu")
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def images(synthetic_root) -> dict[str, list[Path]]:
    test = synthetic_root / "tile" / "test"
    return {"good": sorted((test / "good").glob("*.png")),
            "defect": sorted(p for d in ("hole", "crack", "scratch", "stain")
                             for p in (test / d).glob("*.png"))}


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def png_of(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def assert_serving(client, image: Path) -> None:
    r = client.post("/v1/predict", files=upload(image))
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------- contract
def test_healthz_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "model": "ncae", "runtime": "torch"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"413", "415", "422"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])


def test_model_metadata(client, inspector):
    m = client.get("/v1/model").json()
    assert m["model"] == "ncae" and m["runtime"] == "torch"
    assert m["input_size"] == [32, 32] and m["channels"] == 1
    assert m["threshold"]["value"] == inspector.threshold.value
    assert m["threshold_rule"] == "good-quantile" and "good parts" in m["threshold_description"]
    assert m["normalization"] == inspector.normalization.to_dict()
    assert m["threshold_summary"] == inspector.threshold.summary()
    root = inspector.info["data"]["root"]
    assert root.startswith("/") and root not in json.dumps(m)  # no server paths leak
    assert m["training"]["data"]["root"] == Path(root).name
    assert m["limits"] == {"max_upload_bytes": LIMIT_BYTES, "max_pixels": LIMIT_PIXELS,
                           "max_files": 8}


def test_predict_one_matches_library(client, inspector, images):
    path = images["defect"][0]
    r = client.post("/v1/predict", files=upload(path))
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    ref = inspector.predict([path])[0]
    assert res["file"] == path.name and (res["width"], res["height"]) == (64, 64)
    assert res["score"] == pytest.approx(ref.score, rel=1e-6, abs=1e-7)
    assert res["normalized_score"] == pytest.approx(ref.normalized_score, abs=1e-6)
    assert res["threshold"] == ref.threshold and res["verdict"] == ref.verdict
    heat = png_of(res["heatmap_png"])
    assert heat.size == (32, 32) and heat.mode == "RGBA"
    assert res["overlay_png"] is None


def test_predict_many_in_order_with_summary(client, inspector, images, tmp_path):
    rgb_jpeg = tmp_path / "rgb.jpg"
    Image.fromarray(read_image(images["good"][1], channels=3)).save(rgb_jpeg, quality=95)
    paths = [images["good"][0], *images["defect"][:3], rgb_jpeg]
    r = client.post("/v1/predict", files=upload(*paths), params={"overlay": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    refs = inspector.predict(paths)
    assert [x["file"] for x in body["results"]] == [p.name for p in paths]
    assert [x["index"] for x in body["results"]] == list(range(len(paths)))
    assert [x["verdict"] for x in body["results"]] == [p.verdict for p in refs]
    for x, ref in zip(body["results"], refs):
        assert x["score"] == pytest.approx(ref.score, rel=1e-5, abs=1e-6)
        assert png_of(x["heatmap_png"]).size == (32, 32)
        overlay = png_of(x["overlay_png"])
        assert overlay.size == (32, 32) and overlay.mode == "RGB"
    n_defect = sum(p.verdict == "defect" for p in refs)
    assert body["summary"] == {"total": 5, "ok": 5 - n_defect, "defect": n_defect}
    assert body["heatmap_scale"] == "score" and body["model"] == "ncae"


def test_heatmap_can_be_left_out(client, images):
    r = client.post("/v1/predict", files=upload(images["good"][0]), params={"heatmap": "false"})
    assert r.status_code == 200 and r.json()["results"][0]["heatmap_png"] is None


# ---------------------------------------------------------------------------- errors
def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, format="PNG")  # 1.5 Mpx, a few kB on the wire
    return buf.getvalue()


@pytest.mark.parametrize("case", ["not-image", "truncated", "empty", "dimensions"])
def test_bad_image_gets_4xx_naming_the_file(client, images, case):
    good = images["good"][0]
    data, status, words = {
        "not-image": (b"this is not an image", 415, "not an image"),
        "truncated": (good.read_bytes()[:150], 422, "truncated"),
        "empty": (b"", 422, "empty"),
        "dimensions": (_big_png(), 422, "megapixels"),
    }[case]
    files = upload(good) + [("files", ("bad-upload.png", data, "image/png"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["file"] == "bad-upload.png" and err["index"] == 1
    assert "bad-upload.png" in err["detail"] and words in err["detail"]
    assert_serving(client, good)


def test_oversize_upload_413(client, images):
    blob = np.random.default_rng(0).integers(0, 256, (400, 400), np.uint8)  # ~160 kB PNG
    buf = io.BytesIO()
    Image.fromarray(blob).save(buf, format="PNG")
    files = [("files", (f"noise{i}.png", buf.getvalue(), "image/png")) for i in range(3)]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert_serving(client, images["good"][0])


def test_oversize_chunked_upload_413(client, images):
    def body():
        for _ in range(40):
            yield b"x" * 10_000  # no Content-Length: counted as it arrives

    r = client.post("/v1/predict", content=body(),
                    headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.status_code == 413, r.text
    assert_serving(client, images["good"][0])


def test_too_many_files_and_no_files(client, images):
    r = client.post("/v1/predict", files=upload(*[images["good"][0]] * 9))
    assert r.status_code == 413 and "at most 8" in r.json()["detail"]
    r = client.post("/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "'files'" in r.json()["detail"]
    assert_serving(client, images["good"][0])


def test_busy_service_answers_503(client, images):
    service = client.app.state.service
    service.pending = service.limits.max_queue
    try:
        r = client.post("/v1/predict", files=upload(images["good"][0]))
    finally:
        service.pending = 0
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert_serving(client, images["good"][0])


def test_decode_upload_matches_read_image(tmp_path, images):
    cases = {
        "gray.png": images["good"][0].read_bytes(),
        "rgb.png": None, "deep.png": None, "palette.png": None,
    }
    rng = np.random.default_rng(0)
    write_png(tmp_path / "rgb.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
    write_png(tmp_path / "deep.png", rng.integers(0, 65535, (30, 20), np.uint16))
    Image.fromarray(rng.integers(0, 256, (33, 33, 3), np.uint8)).convert("P").save(
        tmp_path / "palette.png")
    for name in cases:
        path = images["good"][0] if name == "gray.png" else tmp_path / name
        for channels in (1, 3):
            got, (w, h) = decode_upload(path.read_bytes(), name, channels=channels,
                                        size=(32, 32), max_pixels=10**6)
            np.testing.assert_array_equal(got, read_image(path, channels=channels, size=32))
            assert (w, h) == Image.open(path).size


# ---------------------------------------------------------------------------- page
def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'type="file"' in page.text and 'id="drop"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


# ---------------------------------------------------------------------------- heatmaps
def test_heatmap_scale_and_colours():
    norm = ScoreNormalization(low=1.0, threshold=2.0)
    amap = np.array([[0.0, 1.0], [2.0, 8.0]])
    np.testing.assert_allclose(scale_map(amap, "score", norm), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(scale_map(amap - 5, "score", norm)[1, 1], norm(3.0))
    np.testing.assert_allclose(scale_map(amap, "image"), amap / 8.0)
    assert not scale_map(np.ones((3, 3)), "image").any()
    rgba = heatmap_rgba(np.linspace(0, 1, 10).reshape(2, 5))
    assert rgba.dtype == np.uint8 and rgba.shape == (2, 5, 4)
    assert np.all(np.diff(rgba[..., 3].ravel().astype(int)) >= 0)  # opacity rises
    assert colormap_lut().shape == (256, 3)


# ---------------------------------------------------------------------------- concurrency
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_requests_on_a_real_server(model_path, inspector, images):
    import httpx
    import uvicorn

    app = create_app(model_path, workers=2, device="cpu")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        paths = images["good"][:2] + images["defect"][:2]
        expected = [p.verdict for p in inspector.predict(paths)]
        results: list = [None] * 12
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                with httpx.Client(base_url=base, timeout=60) as http:
                    r = http.post("/v1/predict", files=upload(*paths))
                    results[i] = (r.status_code, [x["verdict"] for x in r.json()["results"]])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert all(r == (200, expected) for r in results), results
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_cli_serve_refuses_a_busy_port(model_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(model_path), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already in use" in err[0] and str(port) in err[0]


# ---------------------------------------------------------------------------- regions
@pytest.fixture(scope="module")
def all_defect_client(inspector, tmp_path_factory):
    """A service whose threshold flags every part, so every image has defect regions."""
    from flawscope.threshold import Threshold

    strict = Inspector(inspector.detector, Threshold(-1.0, "manual"), inspector.normalization,
                       inspector.info, inspector.pixel_threshold_info)
    path = strict.save(tmp_path_factory.mktemp("serve-regions") / "strict.safetensors")
    with TestClient(create_app(path, workers=1, device="cpu")) as c:
        yield c, Inspector.load(path, device="cpu")


def test_predict_regions_match_library(all_defect_client, images):
    client, strict = all_defect_client
    paths = images["defect"][:3]
    r = client.post("/v1/predict", files=upload(*paths), params={"overlay": "true"})
    assert r.status_code == 200, r.text
    refs = strict.predict(paths)
    for x, ref in zip(r.json()["results"], refs):
        assert x["verdict"] == "defect" and len(x["regions"]) >= 1
        assert x["pixel_threshold"] == pytest.approx(strict.pixel_threshold)
        assert [g["bbox"] for g in x["regions"]] == [g.bbox for g in ref.regions]
        assert [g["area_px"] for g in x["regions"]] == [g.area_px for g in ref.regions]
        for g in x["regions"]:  # original-image pixels: the uploads are 64 x 64
            x0, y0, x1, y1 = g["bbox"]
            assert 0 <= x0 < x1 <= x["width"] == 64 and 0 <= y0 < y1 <= x["height"] == 64
        overlay = np.asarray(png_of(x["overlay_png"]).convert("RGB"))
        assert (overlay == (255, 0, 255)).all(axis=2).any()  # region outline drawn


def test_region_query_parameters(all_defect_client, images):
    client, _ = all_defect_client
    one = upload(images["defect"][0])
    r = client.post("/v1/predict", files=one, params={"min_region_area": 1e9})
    assert r.status_code == 200, r.text
    (peak,) = r.json()["results"][0]["regions"]  # nothing that large: the peak region
    assert peak["peak"] is True
    r = client.post("/v1/predict", files=one, params={"mm_per_pixel": 0.5})
    for g in r.json()["results"][0]["regions"]:
        assert g["area_mm2"] == pytest.approx(g["area_px"] * 0.25)
    r = client.post("/v1/predict", files=one, params={"min_region_mm2": 3})
    assert r.status_code == 422 and "mm_per_pixel" in r.json()["detail"]


def test_request_pixel_budget_and_time_limit(model_path, images):
    four = upload(*images["good"][:4])  # 64 x 64 each: 4096 pixels
    with TestClient(create_app(model_path, max_request_pixels=3 * 4096, device="cpu")) as c:
        assert c.post("/v1/predict", files=four[:3]).status_code == 200
        r = c.post("/v1/predict", files=four)
        assert r.status_code == 413 and "megapixels together" in r.json()["detail"]
    with TestClient(create_app(model_path, request_timeout=1e-9, device="cpu")) as c:
        r = c.post("/v1/predict", files=four[:1])
        assert r.status_code == 504 and "time limit" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200  # the worker is free again
    with pytest.raises(ConfigError, match="request_timeout"):
        create_app(model_path, request_timeout=0, device="cpu")


def test_a_client_sending_its_body_too_slowly_gets_408():
    import asyncio

    from flawscope.serve.app import BodySizeLimit

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def slow_receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": []}
    asyncio.run(BodySizeLimit(app, limit=10**6, timeout=0.12)(scope, slow_receive, send))
    assert sent[0]["status"] == 408
    assert b"not received within" in b"".join(m.get("body", b"") for m in sent[1:])
