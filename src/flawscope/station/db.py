"""Database URLs, engines and the schema version (Alembic).

``DB`` is a file path (SQLite, WAL mode) or a URL: ``sqlite:///path``,
``postgresql://user:password@host/name`` (driver: psycopg 3). Opening a store upgrades its
schema to this flawscope's newest revision; a database written by a newer flawscope (an
unknown revision) is refused with a message saying so, before anything is changed.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from flawscope.errors import FlawscopeError

MIGRATIONS = Path(__file__).parent / "migrations"
#: Alembic's INFO lines ("Context impl SQLiteImpl.", "Running upgrade ...") are not for users;
#: :func:`upgrade` returns the revisions before and after instead
logging.getLogger("alembic").setLevel(logging.WARNING)
#: an arbitrary constant: the PostgreSQL advisory lock held while the schema is upgraded
_PG_LOCK = 0x666C6177  # "flaw"


class StoreError(FlawscopeError):
    """The record store cannot be opened or written (bad URL, newer schema, unreachable)."""


def database_url(db: str | os.PathLike) -> sa.URL:
    """``DB`` (a path or a URL) as a SQLAlchemy URL; ``postgresql://`` uses psycopg 3."""
    text = os.fspath(db)
    if not text.strip():
        raise StoreError("database: empty path")
    if "://" not in text:
        path = Path(text).expanduser()
        if path.is_dir():
            raise StoreError(f"database {text}: is a folder; give a database file, e.g. "
                             f"{path / 'flawscope-records.db'}")
        return sa.URL.create("sqlite", database=str(path.resolve()))
    try:
        url = make_url(text)
    except sa.exc.ArgumentError:
        raise StoreError(f"database {redact(text)}: not a database URL (expected a file path, "
                         "sqlite:///PATH or postgresql://USER@HOST/NAME)") from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StoreError(f"database {text}: give a file (an in-memory database "
                             "would lose every record)")
        return url
    raise StoreError(f"database {redact(text)}: unsupported {backend!r} (SQLite or "
                     "PostgreSQL)")


def redact(url: str | sa.URL) -> str:
    """The URL with its password hidden (for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True) if isinstance(url, str) \
            else url.render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"


def is_sqlite(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite"


def make_engine(url: sa.URL) -> Engine:
    """An engine; SQLite gets WAL, ``synchronous=FULL`` (a committed record survives a
    power cut, not only a kill), foreign keys and a 30 s busy timeout."""
    if not is_sqlite(url):
        return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                              pool_size=8, max_overflow=8)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                       "busy_timeout=30000"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    return engine


def _alembic_config(connection: sa.Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> list[str]:
    """This flawscope's schema revisions, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def head_revision() -> str:
    return known_revisions()[-1]


def current_revision(connection: sa.Connection) -> str | None:
    """The database's schema revision (None: no flawscope tables yet)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _upgrade_lock(engine: Engine):
    """One process at a time upgrades the schema (workers may start together)."""
    if is_sqlite(engine.url):
        from filelock import FileLock

        with FileLock(f"{engine.url.database}.lock", timeout=120):
            yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK})
            conn.commit()


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Upgrade the schema to ``target``; returns (revision before, revision after).

    Raises :class:`StoreError` for a database of a newer flawscope (an unknown revision).
    """
    from alembic import command

    known = known_revisions()
    with _upgrade_lock(engine), engine.connect() as conn:
        before = current_revision(conn)
        if before is not None and before not in known:
            raise StoreError(
                f"{redact(engine.url)}: its record schema (revision {before}) was written by a "
                f"newer flawscope; this flawscope knows revisions up to {known[-1]}: upgrade "
                "flawscope (pip install -U flawscope) to use this database")
        goal = known[-1] if target == "head" else target
        if before == goal or (before is not None and known.index(before) >= known.index(goal)):
            return before, before
        command.upgrade(_alembic_config(conn), goal)
        conn.commit()
        return before, current_revision(conn) or goal


def check_reachable(engine: Engine) -> None:
    """Connect once; a one-line :class:`StoreError` when the database cannot be reached."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        first = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        raise StoreError(f"database {redact(engine.url)}: cannot open it "
                         f"({first[0] if first else type(exc).__name__})") from None
