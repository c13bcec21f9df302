"""The service with a record store (SQLite): each answer recorded, the review API, API keys
and roles, /metrics, JSON logs with the request id, a failing store."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from flawscope.data.dataset import open_dataset  # noqa: E402
from flawscope.pipeline import Inspector  # noqa: E402
from flawscope.serve import create_app  # noqa: E402
from flawscope.station.auth import KeyRing  # noqa: E402
from flawscope.station.logs import JsonFormatter, access_log, audit_log  # noqa: E402
from flawscope.station.store import RecordStore  # noqa: E402
from flawscope.threshold import Threshold  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 1, "progress": False, "device": "cpu"}
KEYS = {"cam": ("inspect", "camera-key-0123456789"), "anna": ("review", "anna-key-0123456789"),
        "ops": ("admin", "admin-key-0123456789")}


@pytest.fixture(scope="module")
def models(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """``normal``: as trained; ``strict``: threshold below every score (all defects)."""
    inspector = Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", **TINY)
    folder = tmp_path_factory.mktemp("station-models")
    strict = Inspector(inspector.detector, Threshold(-1.0, "manual"), inspector.normalization,
                       inspector.info, inspector.pixel_threshold_info)
    return {"normal": inspector.save(folder / "tile.safetensors"),
            "strict": strict.save(folder / "strict.safetensors")}


@pytest.fixture(scope="module")
def images(synthetic_root) -> list[Path]:
    test = synthetic_root / "tile" / "test"
    return sorted((test / "good").glob("*.png"))[:4] + sorted((test / "crack").glob("*.png"))


def upload(*paths: Path):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.fixture
def station(models, tmp_path):
    """A strict service recording into a fresh SQLite file, every OK image kept."""
    app = create_app(models["strict"], device="cpu", db=tmp_path / "r.db", keep_goods=1.0)
    with TestClient(app) as client:
        yield client


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs():
    handler = Lines()
    for logger in (access_log, audit_log):
        logger.addHandler(handler)
    yield handler.lines
    for logger in (access_log, audit_log):
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------- recording
def test_every_answer_is_recorded(station, models, images, tmp_path):
    r = station.post("/v1/predict?heatmap=false", files=upload(*images[:3]),
                     data={"part_id": "4711", "station": "s-1"},
                     headers={"X-Line": "line-3", "X-Station": "ignored: the form wins"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    ids = [x["record_id"] for x in body["results"]]
    assert len(set(ids)) == 3
    store = station.app.state.store
    model_id = hashlib.sha256(models["strict"].read_bytes()).hexdigest()
    for res, path in zip(body["results"], images):
        rec = store.get(res["record_id"])
        assert (rec["verdict"], rec["score"], rec["threshold"]) == (
            res["verdict"], res["score"], res["threshold"])
        answered = [{k: v for k, v in g.items() if v is not None} for g in res["regions"]]
        assert rec["regions"] == answered and rec["n_regions"] == len(answered) >= 1
        assert rec["model_id"] == model_id and rec["request_id"] == body["request_id"]
        assert (rec["part_id"], rec["station"], rec["line"], rec["camera"]) == (
            "4711", "s-1", "line-3", None)
        assert rec["file_name"] == path.name and rec["image_index"] == res["index"]
        data = path.read_bytes()
        assert rec["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["image_bytes"] == len(data) and (rec["width"], rec["height"]) == (64, 64)
        assert rec["details"]["pixel_threshold"] == res["pixel_threshold"]
        assert rec["latency_ms"] > 0 and rec["source"] == "serve"
        # kept (a defect): the same bytes, content-addressed; its heat map too
        assert store.image_path(rec).read_bytes() == data
        heat = Image.open(io.BytesIO(store.image_path(rec, "heatmap").read_bytes()))
        assert heat.size == (32, 32) and heat.mode == "RGBA"
    assert store.model(model_id)["name"] == "strict.safetensors"


def test_goods_kept_by_sample(models, images, tmp_path):
    app = create_app(models["normal"], device="cpu", db=tmp_path / "g.db", keep_goods=0.0)
    with TestClient(app) as c:
        res = c.post("/v1/predict", files=upload(*images)).json()["results"]
        store = app.state.store
        for x in res:
            rec = store.get(x["record_id"])
            assert rec["image_kept"] == (x["verdict"] == "defect")
            assert (store.image_path(rec) is not None) == rec["image_kept"]
        assert sum(x["verdict"] == "ok" for x in res) >= 1  # some goods were not kept


def test_without_db_nothing_is_recorded(models, images):
    with TestClient(create_app(models["normal"], device="cpu")) as c:
        body = c.post("/v1/predict", files=upload(images[0])).json()
        assert body["results"][0]["record_id"] is None and body["request_id"]
        assert c.get("/v1/inspections").status_code == 404
        assert c.get("/review").status_code == 404
        assert c.get("/v1/model").json()["recording"] is None


def test_a_failing_store_answers_503_not_an_unrecorded_verdict(models, images, tmp_path):
    db = tmp_path / "f.db"
    app = create_app(models["strict"], device="cpu", db=db)
    with TestClient(app) as c:
        assert c.post("/v1/predict", files=upload(images[0])).status_code == 200
        engine = sa.create_engine(f"sqlite:///{db}")
        with engine.begin() as conn:  # the store breaks under the service
            conn.execute(sa.text("ALTER TABLE inspections RENAME TO gone"))
        r = c.post("/v1/predict", files=upload(images[1]))
        assert r.status_code == 503 and "could not be recorded" in r.json()["detail"]
        assert "results" not in r.json()
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE gone RENAME TO inspections"))
        assert c.post("/v1/predict", files=upload(images[1])).status_code == 200
    assert RecordStore(db).count() == 2


# ---------------------------------------------------------------------------- review API
def test_review_api_flow(station, images):
    first = station.post("/v1/predict", files=upload(*images[:4]),
                         data={"part_id": "A"}).json()["results"]
    second = station.post("/v1/predict", files=upload(images[4])).json()["results"]
    ids = [x["record_id"] for x in first + second]
    page = station.get("/v1/inspections", params={"limit": 2}).json()
    assert [x["id"] for x in page["items"]] == ids[::-1][:2]
    rest = station.get("/v1/inspections", params={"limit": 10,
                                                  "cursor": page["next_cursor"]}).json()
    assert [x["id"] for x in rest["items"]] == ids[::-1][2:] and rest["next_cursor"] is None
    queue = station.get("/v1/inspections", params={"queue": "true", "order": "asc"}).json()
    assert [x["id"] for x in queue["items"]] == ids
    assert station.get("/v1/inspections", params={"part_id": "A", "verdict": "ok"}
                       ).json()["items"] == []
    one = station.get(f"/v1/inspections/{ids[0]}", params={"embed": "true"}).json()
    assert one["image_url"] == f"/v1/inspections/{ids[0]}/image"
    assert one["model"]["kind"] == "ncae" and one["reviews"] == []
    png = station.get(one["image_url"])
    assert png.headers["content-type"] == "image/png" and png.content == images[0].read_bytes()
    assert one["image_png"] and one["heatmap_png"]
    assert station.get(one["heatmap_url"]).content[:8] == b"\x89PNG\r\n\x1a\n"

    r = station.post(f"/v1/inspections/{ids[0]}/review",
                     json={"truth": "good", "reviewer": "ann", "note": "dust"})
    assert r.status_code == 200, r.text
    assert (r.json()["truth"], r.json()["reviewer"]) == ("good", "ann")
    station.post(f"/v1/inspections/{ids[1]}/review",
                 json={"truth": "defect", "defect_type": "crack", "reviewer": "ann"})
    reviewed = station.get("/v1/inspections", params={"reviewed": "true"}).json()["items"]
    assert sorted(x["id"] for x in reviewed) == ids[:2]
    stats = station.get("/v1/inspections/stats").json()
    assert stats["confusion"]["counts"]["reject"] == {"good": 1, "defect": 1}
    assert stats["confusion"]["false_reject_share"]["rate"] == 0.5
    assert stats["queue"] == 3 and stats["defect_types"] == {"crack": 1}
    for bad, code in (({"truth": "maybe", "reviewer": "x"}, 422),
                      ({"truth": "good"}, 422),  # no reviewer and no key to name one
                      ({"truth": "good", "reviewer": "x", "defect_type": "crack"}, 422),
                      ({"truth": "good", "reviewer": "x", "extra": 1}, 422)):
        assert station.post(f"/v1/inspections/{ids[2]}/review", json=bad).status_code == code
    missing = station.post("/v1/inspections/999999/review",
                           json={"truth": "good", "reviewer": "x"})
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]
    assert station.get("/v1/inspections", params={"verdict": "bad"}).status_code == 422
    assert station.get("/v1/inspections", params={"from": "yesterday"}).status_code == 422


def test_tiff_is_shown_as_png_for_browsers(station, images, tmp_path):
    tif = tmp_path / "part.tif"
    Image.open(images[0]).save(tif)
    (res,) = station.post("/v1/predict", files=[("files", ("part.tif", tif.read_bytes(),
                                                           "image/tiff"))]).json()["results"]
    url = f"/v1/inspections/{res['record_id']}/image"
    assert station.get(url).content == tif.read_bytes()
    png = station.get(url, params={"as": "png"})
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).tobytes() == Image.open(tif).tobytes()


# ---------------------------------------------------------------------------- keys
@pytest.fixture
def locked(models, tmp_path):
    text = "".join(f"{name} {role} {key}\n" for name, (role, key) in KEYS.items())
    (tmp_path / "keys").write_text(text)
    app = create_app(models["strict"], device="cpu", db=tmp_path / "k.db",
                     keys=KeyRing.from_file(tmp_path / "keys"), keep_goods=1.0)
    with TestClient(app) as client:
        yield client


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][1]}"}


def test_keys_and_roles(locked, images, logs):
    files = upload(images[0])
    assert locked.get("/healthz").status_code == 200  # open
    assert locked.get("/").status_code == 200 and locked.get("/review").status_code == 200
    none = locked.post("/v1/predict", files=files)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in none.json()["detail"]
    wrong = locked.post("/v1/predict", files=files,
                        headers={"Authorization": "Bearer not-a-key-0123456789"})
    assert wrong.status_code == 401 and "unknown" in wrong.json()["detail"]
    ok = locked.post("/v1/predict", files=files, headers=bearer("cam"))
    assert ok.status_code == 200
    rid = ok.json()["results"][0]["record_id"]
    for path in ("/v1/inspections", f"/v1/inspections/{rid}", f"/v1/inspections/{rid}/image",
                 "/v1/inspections/stats"):
        assert locked.get(path).status_code == 401, path
        r = locked.get(path, headers=bearer("cam"))
        assert r.status_code == 403 and "'review'" in r.json()["detail"], path
        assert locked.get(path, headers=bearer("anna")).status_code == 200, path
        assert locked.get(path, headers=bearer("ops")).status_code == 200, path
    assert locked.post("/v1/predict", files=files, headers=bearer("anna")).status_code == 403
    assert locked.post("/v1/predict", files=files,
                       headers={"X-API-Key": KEYS["ops"][1]}).status_code == 200
    assert locked.get("/metrics").status_code == 401
    assert locked.get("/metrics", headers=bearer("cam")).status_code == 200
    assert locked.post("/v1/admin/prune", headers=bearer("anna")).status_code == 403
    # the reviewer is the key's owner unless a name is given; the key is recorded by name
    r = locked.post(f"/v1/inspections/{rid}/review", json={"truth": "defect"},
                    headers=bearer("anna"))
    assert r.status_code == 200 and r.json()["reviewer"] == "anna"
    assert r.json()["reviews"][0]["api_key"] == "anna"
    r = locked.post(f"/v1/inspections/{rid}/review", json={"truth": "good", "reviewer": "Jo"},
                    headers=bearer("ops"))
    assert [(x["reviewer"], x["api_key"]) for x in r.json()["reviews"]] == [
        ("anna", "anna"), ("Jo", "ops")]
    # keys are never logged; who used them is
    text = "\n".join(logs)
    assert all(key not in text for _, key in KEYS.values())
    entries = [json.loads(line) for line in logs]
    assert {"cam", "anna", "ops"} <= {e.get("key") for e in entries}
    assert any(e.get("event") == "review" and e["reviewer"] == "Jo" for e in entries)


def test_json_access_log_carries_the_request_id(station, images, logs):
    r = station.post("/v1/predict", files=upload(images[0]))
    (entry,) = [json.loads(line) for line in logs if "/v1/predict" in line]
    assert entry["request_id"] == r.headers["x-request-id"] == r.json()["request_id"]
    assert (entry["status"], entry["method"], entry["route"]) == (200, "POST", "/v1/predict")
    assert entry["duration_ms"] > 0 and entry["level"] == "info" and entry["time"].endswith("Z")
    bad = station.post("/v1/predict", files=[("files", ("x.png", b"nope", "image/png"))])
    (entry,) = [json.loads(line) for line in logs if json.loads(line).get("status") == 415]
    assert entry["request_id"] == bad.headers["x-request-id"]


# ---------------------------------------------------------------------------- metrics
def test_metrics(station, images):
    from prometheus_client.parser import text_string_to_metric_families

    for paths in (images[:3], images[3:5]):
        assert station.post("/v1/predict", files=upload(*paths)).status_code == 200
    station.get("/v1/inspections")
    text = station.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    model = station.app.state.recorder.model.id[:12]
    assert value("flawscope_verdicts_total", model=model, verdict="defect") == 5
    assert value("flawscope_requests_total", method="POST", route="/v1/predict",
                 status="200") == 2
    assert value("flawscope_request_seconds_count", route="/v1/predict") == 2
    assert value("flawscope_records_total") == 5
    assert 1 <= value("flawscope_db_write_seconds_count") <= 2
    assert value("flawscope_images_kept_total") == 5
    assert value("flawscope_images_kept_bytes_total") == sum(
        p.stat().st_size for p in images[:5])
    assert value("flawscope_queue_depth") == 0
    assert value("flawscope_requests_total", method="GET", route="/v1/inspections",
                 status="200") == 1
