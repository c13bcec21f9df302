"""The record store on SQLite: records, filters and paging, reviews, migrations, retention,
confusion rates, exports, API keys, the group-commit writer."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

import sqlalchemy as sa  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

from flawscope.cli import main  # noqa: E402
from flawscope.errors import ConfigError  # noqa: E402
from flawscope.station import tables as T  # noqa: E402
from flawscope.station.auth import KeyRing, presented_key  # noqa: E402
from flawscope.station.confusion import confusion, proportion  # noqa: E402
from flawscope.station.db import StoreError, current_revision, known_revisions  # noqa: E402
from flawscope.station.recorder import (  # noqa: E402
    GroupWriter,
    ModelIdentity,
    Recorder,
    keep_good,
    make_row,
)
from flawscope.station.store import RecordFilter, RecordStore, Retention, utcnow  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = ModelIdentity("ab" * 32, "part.safetensors", "ncae", 0.5, {"input_size": [32, 32]})


def result(i: int, verdict: str = "ok", score: float = 0.1, **extra) -> dict:
    return {"index": i, "file": f"{i}.png", "width": 64, "height": 48, "score": score,
            "normalized_score": min(score, 1.0), "threshold": 0.5, "verdict": verdict,
            "regions": [{"bbox": [1, 2, 10, 12], "area_px": 90, "max_score": 0.9,
                         "peak": False}] if verdict == "defect" else [],
            "pixel_threshold": 0.4, **extra}


def row(i: int, verdict: str = "ok", score: float = 0.1, *, kept: bool | None = None,
        created_at: datetime | None = None, request_id: str | None = None, **ctx) -> dict:
    return make_row(result(i, verdict, score), model=MODEL, request_id=request_id or f"r{i}",
                    created_at=created_at or utcnow(), file_name=f"{i}.png",
                    image_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                    image_format="png", image_bytes=100 + i, latency_ms=12.5,
                    kept=verdict == "defect" if kept is None else kept, heatmap_sha256=None,
                    source="serve", context=ctx)


@pytest.fixture
def store(tmp_path) -> RecordStore:
    s = RecordStore(tmp_path / "records.db")
    s.register_model(MODEL.id, MODEL.name, MODEL.kind, MODEL.threshold, MODEL.info)
    yield s
    s.close()


# ---------------------------------------------------------------------------- records
def test_records_round_trip_with_details_and_utc_times(store):
    t = datetime(2024, 5, 17, 8, 30, tzinfo=timezone(timedelta(hours=2)))
    r = make_row(result(0, "defect", 0.9, watch=True, pixel_threshold=float("nan"),
                        classification={"label": "tile-crack", "probability": np.float32(0.75)}),
                 model=MODEL, request_id="req", created_at=t, file_name="a.png",
                 image_sha256="c" * 64, image_format="png", image_bytes=10, latency_ms=3.0,
                 kept=True, heatmap_sha256=None, source="serve",
                 context={"station": "s1", "part_id": "4711"})
    (rid,) = store.add([r])
    got = store.get(rid)
    assert got["created_at"] == t and got["created_at"].tzinfo == timezone.utc
    assert got["created_at"].hour == 6  # stored as UTC
    assert got["details"] == {"watch": True, "pixel_threshold": None,
                              "classification": {"label": "tile-crack", "probability": 0.75}}
    assert got["label"] == "tile-crack" and got["label_probability"] == 0.75
    assert got["regions"][0]["bbox"] == [1, 2, 10, 12] and got["n_regions"] == 1
    assert (got["station"], got["part_id"], got["model_id"]) == ("s1", "4711", MODEL.id)
    assert got["reviews"] == [] and got["truth"] is None


def test_a_failed_batch_writes_nothing(store):
    store.add([row(0, request_id="same")])
    # (request_id, image_index) is unique
    with pytest.raises(sa.exc.IntegrityError, match="(?i)unique"):
        store.add([row(1, request_id="other"), row(0, request_id="same")])
    assert store.count() == 1


def test_filters_and_keyset_paging(store):
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = [row(i, "defect" if i % 4 == 0 else "ok", score=i / 100,
                created_at=t0 + timedelta(hours=i), part_id=f"P{i % 3}") for i in range(40)]
    ids = store.add(rows)
    seen, cursor = [], None
    while True:  # newest first, 7 at a time, no gaps or repeats
        page, cursor = store.page(RecordFilter(), limit=7, cursor=cursor)
        seen += [r["id"] for r in page]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    page, _ = store.page(RecordFilter(verdict="defect", min_score=0.1), limit=100, order="asc")
    assert [r["score"] for r in page] == [0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36]
    window = RecordFilter(since=t0 + timedelta(hours=10), until=t0 + timedelta(hours=13),
                          part_id="P1")
    assert [r["id"] for r in store.page(window, order="asc")[0]] == [ids[10]]
    assert store.count(RecordFilter(queue=True)) == 10  # the defects: kept, not reviewed
    with pytest.raises(StoreError, match="verdict"):
        RecordFilter(verdict="bad")


def test_review_history_latest_wins_and_queue(store):
    ids = store.add([row(i, "defect") for i in range(3)])
    store.review(ids[0], "defect", reviewer="ann", defect_type="scratch", note="edge")
    out = store.review(ids[0], "good", reviewer="bob")
    assert out["truth"] == "good" and out["reviewer"] == "bob" and out["defect_type"] is None
    assert [(r["truth"], r["reviewer"], r["defect_type"]) for r in out["reviews"]] == [
        ("defect", "ann", "scratch"), ("good", "bob", None)]
    assert store.count(RecordFilter(queue=True)) == 2
    assert [r["id"] for r in store.page(RecordFilter(reviewed=True))[0]] == [ids[0]]
    with pytest.raises(KeyError, match=str(10**6)):
        store.review(10**6, "good", reviewer="ann")
    with pytest.raises(StoreError, match="defect_type"):
        store.review(ids[1], "good", reviewer="ann", defect_type="dent")
    with pytest.raises(StoreError, match="reviewer"):
        store.review(ids[1], "good", reviewer=" ")


# ---------------------------------------------------------------------------- migrations
def test_migration_from_empty_builds_the_declared_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    s = RecordStore(tmp_path / "new.db")
    assert s.revisions == (None, known_revisions()[-1])
    with s.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), T.metadata)
        queue_sql = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = "
                                         "'ix_inspections_queue'")).scalar_one()
        plan = conn.execute(sa.text(
            "EXPLAIN QUERY PLAN " + str(sa.select(T.inspections.c.id)
                                        .where(*RecordFilter(queue=True).where())
                                        .compile(s.engine, compile_kwargs={"literal_binds":
                                                                           True})))).all()
    assert diff == [], diff
    assert "WHERE image_kept IS 1 AND reviewed_at IS NULL" in queue_sql
    assert "ix_inspections_queue" in str(plan)  # the queue query uses the partial index
    s.close()


def test_migration_from_the_previous_schema_keeps_records(tmp_path):
    from flawscope.station.db import database_url, make_engine, upgrade

    path = tmp_path / "old.db"
    engine = make_engine(database_url(path))
    assert upgrade(engine, "0001") == (None, "0001")
    with engine.begin() as conn:
        assert "reviews" not in sa.inspect(conn).get_table_names()
        conn.execute(sa.insert(T.models).values(id=MODEL.id, name="old", kind="ncae",
                                                threshold=0.5, first_seen=utcnow(), info={}))
        old = sa.Table("inspections", sa.MetaData(), autoload_with=conn)  # 0001's columns
        assert "truth" not in old.c
        conn.execute(sa.insert(old).values(**{k: v for k, v in row(0, "defect").items()
                                              if k in old.c}))
    engine.dispose()
    s = RecordStore(path)  # an older database is upgraded on open
    assert s.revisions == ("0001", "0002")
    (rec,) = s.page()[0]
    assert rec["verdict"] == "defect" and rec["regions"][0]["area_px"] == 90
    assert s.review(rec["id"], "defect", reviewer="ann")["truth"] == "defect"
    assert s.count(RecordFilter(queue=True)) == 0
    s.close()


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path, capsys):
    path = tmp_path / "future.db"
    RecordStore(path).close()
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(StoreError, match=r"revision 0099\) was written by a newer flawscope"):
        RecordStore(path)
    assert main(["records", "upgrade", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer flawscope" in err[0] and "upgrade flawscope" in err[0]
    with engine.connect() as conn:  # untouched
        assert current_revision(conn) == "0099"


def test_bad_database_arguments_are_one_line_errors(tmp_path):
    for db, match in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.db", "does not exist"),
                      ("mysql://u@h/d", "unsupported"), ("sqlite://", "give a file")):
        with pytest.raises(StoreError, match=match):
            RecordStore(db)


# ---------------------------------------------------------------------------- images
def test_goods_are_sampled_by_digest_and_every_defect_is_kept(tmp_path, store):
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    share = np.mean([keep_good(d, 0.05) for d in digests])
    assert 0.045 < share < 0.055
    assert [keep_good(d, 0.05) for d in digests[:50]] == [keep_good(d, 0.05)
                                                         for d in digests[:50]]
    assert not any(keep_good(d, 0) for d in digests[:100])
    rec = Recorder(store, MODEL, keep_goods=0.0)
    try:
        data = b"\x89PNG fake bytes"
        good = rec.prepare(result(0), data, request_id="a", created_at=utcnow(),
                           file_name="g.png", latency_ms=1, heatmap=None, context={})
        bad = rec.prepare(result(1, "defect"), data + b"!", request_id="a",
                          created_at=utcnow(), file_name="d.png", latency_ms=1,
                          heatmap=lambda: b"heat", context={})
        assert not good["image_kept"] and bad["image_kept"]
        path = store.images.path(bad["image_sha256"], bad["image_format"])
        assert path.read_bytes() == data + b"!"
        assert path.stem == hashlib.sha256(data + b"!").hexdigest()
        assert store.images.path(bad["heatmap_sha256"], "png").read_bytes() == b"heat"
        assert not store.images.path(good["image_sha256"], good["image_format"]).exists()
        ids = rec.commit([good, bad]).result(10)
        assert len(ids) == 2
    finally:
        rec.close()


def _keep(store: RecordStore, i: int, data: bytes, created_at: datetime) -> int:
    digest, _ = store.images.put(data, "png")
    r = row(i, "defect", created_at=created_at)
    r.update(image_sha256=digest, image_bytes=len(data))
    (rid,) = store.add([r])
    return rid


def test_retention_never_deletes_reviewed_images(store):
    old = utcnow() - timedelta(days=30)
    shared = b"same image" * 100
    reviewed = _keep(store, 0, shared, old)
    twin = _keep(store, 1, shared, old)  # the same image, not reviewed
    alone = _keep(store, 2, b"other image" * 100, old)
    fresh = _keep(store, 3, b"new image" * 100, utcnow())
    store.review(reviewed, "defect", reviewer="ann")
    for p in store.images.root.rglob("*.png"):  # written long ago (past the grace period)
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    report = store.prune(Retention(max_age_days=7))
    assert report.records == 2 and report.files == 1  # twin and alone released; only
    assert store.get(twin)["image_kept"] is False    # alone's file was unreferenced
    assert store.image_path(store.get(reviewed)).exists()  # shared with the reviewed one
    assert store.image_path(store.get(fresh)).exists()
    assert store.image_path(store.get(alone)) is None
    # by size: the oldest unreviewed goes first; the reviewed one stays whatever the limit
    report = store.prune(Retention(max_bytes=1, grace_s=0))
    assert store.get(fresh)["image_kept"] is False
    assert store.image_path(store.get(reviewed)).read_bytes() == shared
    with pytest.raises(StoreError, match="--retain-days 0: must be positive"):
        Retention(max_age_days=0)


def test_recently_written_files_survive_until_their_record_exists(store):
    digest, _ = store.images.put(b"in flight", "png")  # the record is not committed yet
    assert store.prune(Retention(max_age_days=1)).files == 0
    assert store.images.path(digest, "png").exists()


# ---------------------------------------------------------------------------- confusion
def test_proportion_is_clopper_pearson():
    p = proportion(3, 40)
    ci = binomtest(3, 40).proportion_ci(method="exact")
    assert p["rate"] == 3 / 40 and (p["low"], p["high"]) == (ci.low, ci.high)
    assert proportion(0, 0)["rate"] is None
    assert proportion(0, 10)["low"] == 0.0 and proportion(10, 10)["high"] == 1.0


def test_confusion_rates_from_review_counts():
    counts = {"sample": {"defect": {"good": 6, "defect": 14}, "ok": {"good": 98, "defect": 2}},
              "outside_sample": 1, "inspected": {"defect": 200, "ok": 9800}}
    c = confusion(counts)
    assert c["counts"] == {"reject": {"good": 6, "defect": 14}, "pass": {"good": 98,
                                                                         "defect": 2}}
    assert c["false_reject_share"]["rate"] == 0.3 and c["escape_rate"]["rate"] == 0.02
    r, p1, p2 = 0.02, 0.3, 0.02
    frr = c["false_reject_rate"]
    assert frr["rate"] == pytest.approx(r * p1 / (r * p1 + (1 - r) * (1 - p2)))
    assert frr["low"] < frr["rate"] < frr["high"]
    assert c["reviewed"] == 120 and c["outside_sample"] == 1
    none = confusion({"sample": {"defect": {"good": 0, "defect": 0}, "ok": {"good": 0,
                                                                            "defect": 0}},
                      "inspected": {"ok": 0, "defect": 0}})
    assert none["false_reject_rate"]["rate"] is None and none["escape_rate"]["rate"] is None


def test_review_counts_use_the_review_sample_only(store):
    ids = store.add([row(i, "defect" if i < 4 else "ok", kept=i < 6) for i in range(10)])
    for rid, truth in zip(ids[:6], ["good", "defect", "defect", "defect", "good", "defect"]):
        store.review(rid, truth, reviewer="ann")
    store.review(ids[8], "defect", reviewer="ann")  # an escape found later, not sampled
    counts = store.review_counts()
    assert counts["sample"] == {"defect": {"good": 1, "defect": 3},
                                "ok": {"good": 1, "defect": 1}}
    assert counts["outside_sample"] == 1 and counts["inspected"] == {"defect": 4, "ok": 6}
    assert counts["queue"] == 0


# ---------------------------------------------------------------------------- export
def test_export_parquet_and_csv(store, tmp_path):
    import pyarrow.parquet as pq

    t0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
    ids = store.add([row(i, "defect" if i == 2 else "ok", score=i / 10,
                         created_at=t0 + timedelta(days=i), part_id="=cmd|x" if i == 3 else "7")
                     for i in range(5)])
    assert main(["records", "export", str(store.url.database), "--since", "2024-05-02",
                 "-o", str(tmp_path / "x.parquet")]) == 0
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [r["id"] for r in table] == ids[1:]
    assert table[1]["verdict"] == "defect" and table[1]["image_path"].endswith(".png")
    assert table[0]["image_path"] is None  # an OK part whose image was not kept
    assert table[0]["created_at"] == t0 + timedelta(days=1)
    assert json.loads(table[1]["regions"])[0]["area_px"] == 90
    assert main(["records", "export", str(store.url.database), "--until", "2024-05-03T00:00",
                 "-o", str(tmp_path / "x.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "x.csv").read_text())))
    assert [int(r["id"]) for r in rows] == ids[:2] and rows[0]["created_at"].endswith("Z")
    assert float(rows[1]["score"]) == 0.1
    main(["records", "export", str(store.url.database), "-o", str(tmp_path / "all.csv")])
    parts = [r["part_id"] for r in csv.DictReader(io.StringIO((tmp_path / "all.csv")
                                                               .read_text()))]
    assert parts[3] == "'=cmd|x"  # no spreadsheet formula
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_errors_are_one_line(store, tmp_path, capsys):
    db = str(store.url.database)
    for args, match in ((["-o", str(tmp_path / "x.txt")], ".parquet or .csv"),
                        (["--since", "yesterday", "-o", str(tmp_path / "x.csv")], "--since"),
                        (["-o", str(tmp_path / "no" / "x.csv")], "does not exist")):
        assert main(["records", "export", db, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


# ---------------------------------------------------------------------------- keys
def test_keys_file_roles_and_errors(tmp_path):
    good = tmp_path / "keys"
    hashed = hashlib.sha256(b"reviewer-key-0123456789").hexdigest()
    good.write_text("# name roles key\ncam inspect camera-key-0123456789\n"
                    f"anna review sha256:{hashed}  # stored as a digest\n"
                    "ops admin admin-key-0123456789abc\nboth inspect,review both-key-0123456789\n")
    ring = KeyRing.from_file(good)
    assert len(ring) == 4
    cam = ring.identify("camera-key-0123456789")
    assert cam.name == "cam" and cam.may("inspect") and not cam.may("review")
    anna = ring.identify("reviewer-key-0123456789")
    assert anna.name == "anna" and anna.may("review") and not anna.may("admin")
    ops = ring.identify("admin-key-0123456789abc")
    assert all(ops.may(r) for r in ("inspect", "review", "admin"))
    assert ring.identify("both-key-0123456789").roles == {"inspect", "review"}
    assert ring.identify("camera-key-012345678") is None and ring.identify("") is None
    assert presented_key("Bearer abc", None) == "abc" and presented_key(None, "k") == "k"
    assert presented_key("Basic abc", None) is None
    for text, match in (("cam inspect short\n", "shorter than 16"),
                        ("cam inspect\n", "3 fields"),
                        ("cam root key-0123456789abcdef\n", "roles"),
                        ("a inspect key-0123456789abcdef\na review key-0123456789abcdeX\n",
                         "twice"),
                        ("a inspect key-0123456789abcdef\nb review key-0123456789abcdef\n",
                         "same key"),
                        ("# nothing\n", "no keys")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match) as info:
            KeyRing.from_file(bad)
        assert str(bad) in str(info.value)
        assert "0123456789" not in str(info.value)  # no key in messages
    with pytest.raises(ConfigError, match="shorter"):
        KeyRing.single("abc")


# ---------------------------------------------------------------------------- writer
def test_group_writer_batches_concurrent_requests(store):
    commits = []

    def write(rows):
        commits.append(len(rows))
        time.sleep(0.02)  # a slow disk: requests pile up behind a commit
        return store.add(rows)

    writer = GroupWriter(write)
    futures, lock = [], threading.Lock()

    def client(k):
        for j in range(10):
            f = writer.submit([row(1000 * k + j, request_id=f"{k}-{j}")])
            with lock:
                futures.append(f)
            f.result(10)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    ids = [f.result()[0] for f in futures]
    assert len(set(ids)) == 80 and store.count() == 80
    assert len(commits) < 80 and sum(commits) == 80  # shared commits


def test_group_writer_isolates_a_bad_submission(store):
    gate = threading.Event()

    def write(rows):
        gate.wait(5)
        return store.add(rows)

    writer = GroupWriter(write)
    first = writer.submit([row(0, request_id="x")])
    bad = writer.submit([row(1, request_id="dup"), row(1, request_id="dup")])
    ok = writer.submit([row(2, request_id="y")])
    gate.set()
    assert len(first.result(10)) == 1 and len(ok.result(10)) == 1
    with pytest.raises(sa.exc.IntegrityError, match="(?i)unique"):
        bad.result(10)
    writer.close()
    assert store.count() == 2


def test_predict_record_cli(tmp_path, synthetic_root, capsys):
    from flawscope.data.dataset import open_dataset
    from flawscope.pipeline import Inspector

    inspector = Inspector.train(open_dataset(synthetic_root / "tile"), "ncae", image_size=32,
                                widths=[8, 16], latent_channels=8, batch_size=8, epochs=1,
                                progress=False, device="cpu")
    model = inspector.save(tmp_path / "m.safetensors")
    images = sorted((synthetic_root / "tile" / "test").rglob("*.png"))[:6]
    db = tmp_path / "p.db"
    assert main(["predict", str(model), *map(str, images), "--record", str(db),
                 "--device", "cpu"]) == 0
    assert "6 verdicts recorded" in capsys.readouterr().err
    s = RecordStore(db)
    recs = s.page(order="asc")[0]
    assert [r["file_name"] for r in recs] == [p.name for p in images]
    assert {r["source"] for r in recs} == {"predict"}
    assert recs[0]["model_id"] == hashlib.sha256(model.read_bytes()).hexdigest()
    refs = inspector.predict(images)
    assert [r["verdict"] for r in recs] == [p.verdict for p in refs]
    assert [r["score"] for r in recs] == pytest.approx([p.score for p in refs], rel=1e-5)
    for r in recs:
        assert r["image_kept"] == (r["verdict"] == "defect" or keep_good(r["image_sha256"],
                                                                          0.01))
        assert r["image_sha256"] == hashlib.sha256(
            Path(r["details"]["path"]).read_bytes()).hexdigest()
    s.close()


def test_image_suffix_from_the_first_bytes():
    from PIL import Image

    from flawscope.station.images import image_suffix

    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif"), ("BMP", "bmp"),
                        ("WEBP", "webp"), ("GIF", "gif"), ("PPM", "ppm")):
        for mode in ("L", "RGB"):
            buf = io.BytesIO()
            Image.new(mode, (8, 8)).save(buf, fmt)
            assert image_suffix(buf.getvalue()) == suffix, (fmt, mode)
    assert image_suffix(b"not an image") == "bin"
