"""The station as it runs: `flawscope serve` killed with SIGKILL under load loses no
acknowledged record (SQLite); PostgreSQL for real: the store, its migrations, and two service
workers on one database with no lost or duplicated record."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa  # noqa: E402
from test_station import MODEL, row  # noqa: E402

from flawscope.cli import main  # noqa: E402
from flawscope.station.db import StoreError, database_url, make_engine, redact, upgrade  # noqa: E402
from flawscope.station.store import RecordFilter, RecordStore  # noqa: E402
from station_support import (  # noqa: E402
    Server,
    fresh_database,
    hammer,
    throwaway_cluster,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def model_path(synthetic_root, tmp_path_factory) -> Path:
    return tiny_model(synthetic_root / "tile", tmp_path_factory.mktemp("station-server"))


@pytest.fixture(scope="module")
def files(synthetic_root) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes())
            for p in sorted((synthetic_root / "tile" / "test").rglob("*.png"))]


def _load(servers: list[Server], files, clients: int, seconds: float,
          kill: Server | None = None):
    stop = threading.Event()
    acknowledged: list[int] = []
    answered: list[int] = []
    errors: list[str] = []
    threads = []
    for srv in servers:
        threads += hammer(srv.base, files, clients, stop, acknowledged, answered, errors)
    time.sleep(seconds)
    if kill is not None:
        kill.kill9()  # mid-load: requests in flight are lost, answered ones must not be
    stop.set()
    for t in threads:
        t.join(60)
    return acknowledged, answered, errors


# ---------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_record(model_path, files, tmp_path):
    db = tmp_path / "records.db"
    acknowledged_all: list[int] = []
    for round_ in range(2):
        srv = Server(model_path, "--db", str(db), "--keep-goods", "0.2").wait_ready()
        try:
            acknowledged, answered, errors = _load([srv], files, 4, 3.0, kill=srv)
        finally:
            srv.stop()
        assert not errors, errors[:3]
        assert len(acknowledged) > 0, f"round {round_}: no request was answered"
        acknowledged_all += acknowledged
        store = RecordStore(db)
        try:
            stored = {r for rows in store.iter_rows() for r in (x["id"] for x in rows)}
            with store.engine.connect() as conn:
                assert conn.execute(sa.text("PRAGMA integrity_check")).scalar_one() == "ok"
        finally:
            store.close()
        missing = set(acknowledged_all) - stored
        assert not missing, f"round {round_}: {len(missing)} acknowledged records lost"
        assert len(stored) >= len(acknowledged_all) == len(set(acknowledged_all))


# ---------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL server URL: $FLAWSCOPE_TEST_POSTGRES, else a throwaway cluster."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install "
                        "'flawscope[station]'")
    url = os.environ.get("FLAWSCOPE_TEST_POSTGRES")
    if url:
        try:
            engine = make_engine(database_url(url))
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            engine.dispose()
        except sa.exc.OperationalError as exc:
            pytest.skip(f"FLAWSCOPE_TEST_POSTGRES={redact(url)} cannot be reached: "
                        f"{str(exc.orig).strip().splitlines()[0]}")
        yield url
        return
    cluster = throwaway_cluster()
    try:
        url = cluster.__enter__()
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def pg_db(pg_server) -> str:
    return fresh_database(pg_server)


@pytest.mark.postgres
def test_postgres_store(pg_db, tmp_path):
    store = RecordStore(pg_db, tmp_path / "images")
    try:
        assert store.revisions == (None, "0002")
        store.register_model(MODEL.id, MODEL.name, MODEL.kind, MODEL.threshold, MODEL.info)
        store.register_model(MODEL.id, MODEL.name, MODEL.kind, MODEL.threshold, MODEL.info)
        ids = store.add([row(i, "defect" if i % 2 else "ok") for i in range(6)])
        assert ids == sorted(ids) and len(set(ids)) == 6
        page, cursor = store.page(RecordFilter(verdict="defect"), limit=2)
        assert [r["id"] for r in page] == [ids[5], ids[3]] and cursor == ids[3]
        rec = store.review(ids[1], "defect", reviewer="ann", defect_type="crack")
        assert rec["truth"] == "defect" and rec["reviews"][0]["defect_type"] == "crack"
        assert rec["created_at"].tzinfo is not None
        assert store.review_counts()["sample"]["defect"] == {"good": 0, "defect": 1}
        assert store.count(RecordFilter(queue=True)) == 2
        with pytest.raises(sa.exc.IntegrityError, match="(?i)unique"):
            store.add([row(0)])  # (request_id, image_index) already recorded
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_migration_from_the_previous_schema_and_newer_refused(pg_db, tmp_path,
                                                                       capsys):
    engine = make_engine(database_url(pg_db))
    assert upgrade(engine, "0001") == (None, "0001")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO models VALUES (:i, 'old', 'ncae', 0.5, now(), "
                             "'{}')"), {"i": MODEL.id})
        old = sa.Table("inspections", sa.MetaData(), autoload_with=conn)
        assert "truth" not in old.c
        conn.execute(sa.insert(old).values(**{k: v for k, v in row(0, "defect").items()
                                              if k in old.c}))
    store = RecordStore(pg_db, tmp_path)
    assert store.revisions == ("0001", "0002")
    (rec,) = store.page()[0]
    assert store.review(rec["id"], "good", reviewer="ann")["truth"] == "good"
    store.close()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer flawscope"):
        RecordStore(pg_db, tmp_path)
    assert main(["records", "upgrade", pg_db]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "revision 0099" in err[0]


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_one_postgres_database(pg_db, model_path, files, tmp_path):
    images = tmp_path / "images"
    servers = [Server(model_path, "--db", pg_db, "--images", str(images), "--keep-goods",
                      "0.5") for _ in range(2)]  # both start (and migrate) at once
    try:
        for srv in servers:
            srv.wait_ready()
        acknowledged, answered, errors = _load(servers, files, 3, 5.0)
    finally:
        for srv in servers:
            srv.stop()
    assert not errors, errors[:3]
    assert len(acknowledged) == sum(answered) > 0
    assert len(set(acknowledged)) == len(acknowledged), "one id answered twice"
    store = RecordStore(pg_db, images)
    try:
        with store.engine.connect() as conn:
            n, requests, stations = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT request_id), count(DISTINCT station) "
                "FROM inspections")).one()
        assert n == len(acknowledged), "records lost or written twice"
        assert requests == len(answered) and stations == 3  # client-0..2 on both servers
        stored = {x["id"] for rows in store.iter_rows() for x in rows}
        assert stored == set(acknowledged)
        for rows in store.iter_rows(RecordFilter(queue=True)):
            for rec in rows:  # every kept image is in the shared folder
                assert store.image_path(rec).is_file()
    finally:
        store.close()


# ---------------------------------------------------------------------------- CLI start
def test_serve_refuses_bad_station_options_in_one_line(model_path, tmp_path, capsys):
    (tmp_path / "keys").write_text("cam inspect short\n")
    cases = [
        (["--db", str(tmp_path)], "is a folder"),
        (["--db", "mysql://u@h/x"], "unsupported"),
        (["--keep-goods", "2"], "--keep-goods"),
        (["--keys", str(tmp_path / "keys")], "shorter than 16"),
        (["--api-key", "abc"], "shorter than 16"),
        (["--db", "off", "--retain-days", "3"], "need a database"),
        (["--retain-days", "0"], "--retain-days"),
    ]
    for args, match in cases:
        assert main(["serve", str(model_path), "--port", "0", "--device", "cpu",
                     "--db", str(tmp_path / "x.db"), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (args, err)
