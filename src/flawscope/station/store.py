"""The inspection record store: every verdict, its model and (sampled) image; reviews.

:class:`RecordStore` opens (and upgrades) a database, writes records in one transaction per
call, lists them with filters and keyset paging, records reviews and applies retention to the
kept images. It has no HTTP in it: the service, ``predict --record`` and ``flawscope
records`` all go through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flawscope.station import tables as T
from flawscope.station.db import (
    StoreError,
    check_reachable,
    database_url,
    is_sqlite,
    make_engine,
    redact,
    upgrade,
)
from flawscope.station.images import ImageFolder

TRUTHS = ("good", "defect")
VERDICTS = ("ok", "defect")
#: most records one list call returns
MAX_PAGE = 500
#: record columns as the API and exports show them (``details`` merged, ids as they are)
RECORD_COLUMNS = tuple(c.name for c in T.inspections.columns)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def default_images_dir(url: sa.URL) -> Path:
    """Next to a SQLite file (``records.db`` -> ``records.images/``); for a server database,
    ``flawscope-images`` in the working directory (give ``--images`` for a shared folder)."""
    if is_sqlite(url):
        db = Path(url.database or "flawscope-records.db")
        return db.with_name(db.stem + ".images")
    return Path("flawscope-images").resolve()


@dataclass
class RecordFilter:
    """Which records :meth:`RecordStore.page` returns; None: no condition."""

    verdict: str | None = None
    truth: str | None = None
    reviewed: bool | None = None
    queue: bool | None = None  # True: image kept and not reviewed (the review queue)
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = None
    max_score: float | None = None
    model_id: str | None = None
    part_id: str | None = None
    station: str | None = None
    line: str | None = None
    camera: str | None = None

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise StoreError(f"verdict={self.verdict!r}: expected one of {', '.join(VERDICTS)}")
        if self.truth is not None and self.truth not in TRUTHS:
            raise StoreError(f"truth={self.truth!r}: expected one of {', '.join(TRUTHS)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:  # a naive time is taken as UTC
                setattr(self, name, value.replace(tzinfo=timezone.utc))

    def where(self) -> list[sa.ColumnElement[bool]]:
        c = T.inspections.c
        out: list[sa.ColumnElement[bool]] = []
        if self.queue is not None:
            out.append(sa.and_(c.image_kept.is_(True), c.reviewed_at.is_(None)) if self.queue
                       else sa.or_(c.image_kept.is_(False), c.reviewed_at.is_not(None)))
        if self.reviewed is not None:
            out.append(c.reviewed_at.is_not(None) if self.reviewed else c.reviewed_at.is_(None))
        for name in ("verdict", "truth", "model_id", "part_id", "station", "line", "camera"):
            value = getattr(self, name)
            if value is not None:
                out.append(c[name] == value)
        if self.since is not None:
            out.append(c.created_at >= self.since)
        if self.until is not None:
            out.append(c.created_at < self.until)
        if self.min_score is not None:
            out.append(c.score >= self.min_score)
        if self.max_score is not None:
            out.append(c.score <= self.max_score)
        return out


@dataclass
class Retention:
    """Limits on the kept images: older than ``max_age_days`` or beyond ``max_bytes`` in
    total (oldest first) are deleted, except those of reviewed records. None: no limit."""

    max_age_days: float | None = None
    max_bytes: int | None = None
    #: a file written or reused this recently is never deleted (a record may be on its way)
    grace_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_age_days is not None and not self.max_age_days > 0:
            raise StoreError(f"--retain-days {self.max_age_days}: must be positive")
        if self.max_bytes is not None and not self.max_bytes > 0:
            raise StoreError(f"--retain-gb: must be positive (got {self.max_bytes} bytes)")

    @property
    def active(self) -> bool:
        return self.max_age_days is not None or self.max_bytes is not None


@dataclass
class PruneReport:
    records: int = 0  # records whose image was released
    files: int = 0
    bytes: int = 0
    details: dict[str, int] = field(default_factory=dict)


class RecordStore:
    """A record database and its image folder.

    ``db``: a file path (SQLite) or a URL (``postgresql://...``); ``images``: the image
    folder (default: :func:`default_images_dir`). The schema is upgraded on open.
    """

    def __init__(self, db: str | os.PathLike, images: str | os.PathLike | None = None) -> None:
        self.url = database_url(db)
        if is_sqlite(self.url):
            folder = Path(self.url.database or "").parent
            if not folder.is_dir():
                raise StoreError(f"database {self.url.database}: folder {folder} does not exist")
        self.engine = make_engine(self.url)
        check_reachable(self.engine)
        self.revisions = upgrade(self.engine)
        self.images = ImageFolder(images if images is not None else default_images_dir(self.url))

    def __repr__(self) -> str:
        return f"RecordStore({self.display_url!r})"

    @property
    def display_url(self) -> str:
        return self.url.database if is_sqlite(self.url) else redact(self.url)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------ writing
    def register_model(self, model_id: str, name: str, kind: str, threshold: float,
                       info: dict[str, Any]) -> None:
        """Add the model (id: SHA-256 of its file) unless it is known already."""
        row = {"id": model_id, "name": name[:255], "kind": kind[:64],
               "threshold": float(threshold), "first_seen": utcnow(), "info": info}
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        with self.engine.begin() as conn:
            conn.execute(insert(T.models).values(row).on_conflict_do_nothing())

    def add(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert ``rows`` (see :func:`make_row`) in one transaction; their ids, in order.

        When this returns, the records are committed (durable); on error nothing is written.
        """
        if not rows:
            return []
        stmt = sa.insert(T.inspections).returning(T.inspections.c.id,
                                                  sort_by_parameter_order=True)
        with self.engine.begin() as conn:
            return [r[0] for r in conn.execute(stmt, list(rows))]

    # ------------------------------------------------------------------------ reading
    def page(self, where: RecordFilter | None = None, *, limit: int = 50,
             cursor: int | None = None, order: str = "desc") -> tuple[list[dict], int | None]:
        """One page of records, newest first (``order="asc"``: oldest first), and the cursor
        of the next page (None: no more). Keyset paging: any page costs the same."""
        if order not in ("asc", "desc"):
            raise StoreError(f"order={order!r}: expected asc or desc")
        limit = max(1, min(int(limit), MAX_PAGE))
        c = T.inspections.c
        conds = (where or RecordFilter()).where()
        if cursor is not None:
            conds.append(c.id < cursor if order == "desc" else c.id > cursor)
        stmt = (sa.select(T.inspections).where(*conds)
                .order_by(c.id.desc() if order == "desc" else c.id.asc()).limit(limit + 1))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["id"] if more and rows else None)

    def count(self, where: RecordFilter | None = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(T.inspections).where(
            *(where or RecordFilter()).where())
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def get(self, record_id: int) -> dict[str, Any] | None:
        """The record and its review history (``reviews``, oldest first)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T.inspections).where(
                T.inspections.c.id == record_id)).first()
            if row is None:
                return None
            out = dict(row._mapping)
            out["reviews"] = [dict(r._mapping) for r in conn.execute(
                sa.select(T.reviews).where(T.reviews.c.inspection_id == record_id)
                .order_by(T.reviews.c.id))]
        return out

    def model(self, model_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T.models).where(T.models.c.id == model_id)).first()
        return None if row is None else dict(row._mapping)

    def image_path(self, record: dict[str, Any], which: str = "image") -> Path | None:
        """The kept image (``which="image"``) or heat map (``"heatmap"``) of a record."""
        if not record.get("image_kept"):
            return None
        if which == "heatmap":
            digest = record.get("heatmap_sha256")
            return self.images.path(digest, "png") if digest else None
        return self.images.path(record["image_sha256"], record["image_format"])

    def iter_rows(self, where: RecordFilter | None = None,
                  chunk: int = 5000) -> Iterator[list[dict[str, Any]]]:
        """All matching records, oldest first, in chunks (for exports)."""
        cursor = None
        while True:
            rows, cursor = self._chunk(where, chunk, cursor)
            if rows:
                yield rows
            if cursor is None:
                return

    def _chunk(self, where: RecordFilter | None, chunk: int,
               cursor: int | None) -> tuple[list[dict], int | None]:
        c = T.inspections.c
        conds = (where or RecordFilter()).where()
        if cursor is not None:
            conds.append(c.id > cursor)
        stmt = sa.select(T.inspections).where(*conds).order_by(c.id).limit(chunk + 1)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        more = len(rows) > chunk
        rows = rows[:chunk]
        return rows, (rows[-1]["id"] if more and rows else None)

    # ------------------------------------------------------------------------ reviews
    def review(self, record_id: int, truth: str, *, reviewer: str,
               defect_type: str | None = None, note: str | None = None,
               api_key: str | None = None) -> dict[str, Any]:
        """Record an operator's decision; the latest one is the record's ``truth``."""
        if truth not in TRUTHS:
            raise StoreError(f"truth={truth!r}: expected good or defect")
        if not reviewer or not reviewer.strip():
            raise StoreError("reviewer: give the reviewer's name (or use an API key)")
        if truth == "good" and defect_type:
            raise StoreError("defect_type: only for truth=defect")
        now = utcnow()
        c = T.inspections.c
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(c.id).where(c.id == record_id)).first()
            if found is None:
                raise KeyError(record_id)
            conn.execute(sa.insert(T.reviews).values(
                inspection_id=record_id, created_at=now, truth=truth,
                defect_type=defect_type or None, note=note or None,
                reviewer=reviewer.strip()[:200], api_key=api_key))
            conn.execute(sa.update(T.inspections).where(c.id == record_id).values(
                truth=truth, defect_type=defect_type or None, reviewed_at=now,
                reviewer=reviewer.strip()[:200]))
        out = self.get(record_id)
        assert out is not None
        return out

    def review_counts(self, where: RecordFilter | None = None) -> dict[str, Any]:
        """Counts for the confusion table: reviewed records of the review sample by
        (verdict, truth), every record by verdict, records reviewed outside the sample."""
        base = (where or RecordFilter()).where()
        c = T.inspections.c
        with self.engine.connect() as conn:
            pairs = conn.execute(
                sa.select(c.verdict, c.truth, c.image_kept, sa.func.count())
                .where(c.reviewed_at.is_not(None), *base)
                .group_by(c.verdict, c.truth, c.image_kept)).all()
            totals = conn.execute(sa.select(c.verdict, sa.func.count()).where(*base)
                                  .group_by(c.verdict)).all()
            queue = conn.execute(sa.select(sa.func.count()).select_from(T.inspections).where(
                c.image_kept.is_(True), c.reviewed_at.is_(None), *base)).scalar_one()
            types = conn.execute(
                sa.select(c.defect_type, sa.func.count()).where(
                    c.reviewed_at.is_not(None), c.defect_type.is_not(None), *base)
                .group_by(c.defect_type).order_by(sa.func.count().desc()).limit(50)).all()
        sample: dict[str, dict[str, int]] = {v: {t: 0 for t in TRUTHS} for v in VERDICTS}
        outside = 0
        for verdict, truth, kept, n in pairs:
            if kept and verdict in sample and truth in TRUTHS:
                sample[verdict][truth] += int(n)
            else:
                outside += int(n)
        return {"sample": sample, "outside_sample": outside,
                "inspected": {v: 0 for v in VERDICTS} | {v: int(n) for v, n in totals},
                "queue": int(queue), "defect_types": {t: int(n) for t, n in types}}

    # ------------------------------------------------------------------------ retention
    def prune(self, retention: Retention, now: datetime | None = None) -> PruneReport:
        """Release the images of unreviewed records beyond ``retention`` (oldest first) and
        delete files no kept record refers to. Reviewed records keep their images."""
        report = PruneReport()
        now = now or utcnow()
        c = T.inspections.c
        unreviewed_kept = sa.and_(c.image_kept.is_(True), c.reviewed_at.is_(None))
        with self.engine.begin() as conn:
            if retention.max_age_days is not None:
                cutoff = now - timedelta(days=retention.max_age_days)
                n = conn.execute(sa.update(T.inspections).where(
                    unreviewed_kept, c.created_at < cutoff).values(image_kept=False)).rowcount
                report.details["by_age"] = int(n or 0)
                report.records += int(n or 0)
        if retention.max_bytes is not None:
            report.details["by_size"] = self._release_by_size(retention.max_bytes,
                                                              retention.grace_s)
            report.records += report.details["by_size"]
        files, size = self.images.remove_unreferenced(self.referenced(), retention.grace_s)
        report.files, report.bytes = files, size
        return report

    def _release_by_size(self, max_bytes: int, grace_s: float) -> int:
        """Release oldest unreviewed images until the folder would hold at most
        ``max_bytes`` (estimated from the records' image sizes; heat maps are small)."""
        excess = self.images.total_bytes() - max_bytes
        released = 0
        c = T.inspections.c
        while excess > 0:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    sa.select(c.id, c.image_bytes).where(
                        c.image_kept.is_(True), c.reviewed_at.is_(None),
                        c.created_at < utcnow() - timedelta(seconds=grace_s))
                    .order_by(c.id).limit(1000)).all()
                if not rows:
                    break
                ids = []
                for rid, nbytes in rows:
                    ids.append(rid)
                    excess -= int(nbytes) + 2048
                    if excess <= 0:
                        break
                conn.execute(sa.update(T.inspections).where(c.id.in_(ids))
                             .values(image_kept=False))
                released += len(ids)
        return released

    def referenced(self) -> set[str]:
        """Digests of every image and heat map a kept record refers to."""
        c = T.inspections.c
        out: set[str] = set()
        with self.engine.connect() as conn:
            for image, heat in conn.execute(sa.select(c.image_sha256, c.heatmap_sha256)
                                            .where(c.image_kept.is_(True))):
                out.add(image)
                if heat:
                    out.add(heat)
        return out


def finite(x: Any) -> float | None:
    """A float, or None for None / NaN / inf (JSON and SQL have no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
