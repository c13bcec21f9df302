"""The record store's tables (SQLAlchemy Core), as of the newest schema revision.

The migrations in :mod:`flawscope.station.migrations` build exactly these tables; a test
compares the two. Times are UTC (:class:`UTCDateTime`), images are referenced by their SHA-256
(files in the content-addressed folder, :mod:`flawscope.station.images`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

#: ``BIGINT`` in PostgreSQL, ``INTEGER`` in SQLite (only that is SQLite's auto-increment rowid)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC time: ``timestamptz`` in PostgreSQL, naive UTC text in SQLite
    (which keeps no zone); always read back as an aware UTC ``datetime``."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give the time zone (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

#: the review queue (image kept, not reviewed) and the reviewed records: partial indexes whose
#: conditions are written as the queries write them, so that SQLite can use them
QUEUE = sa.and_(sa.column("image_kept", sa.Boolean).is_(True),
                sa.column("reviewed_at").is_(None))
REVIEWED = sa.column("reviewed_at").is_not(None)

#: one row per model file the station has answered with (id: SHA-256 of the file's bytes)
models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, doc="file name when first seen"),
    sa.Column("kind", sa.String(64), nullable=False, doc="detector type, e.g. patchcore"),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("first_seen", UTCDateTime, nullable=False),
    sa.Column("info", sa.JSON, nullable=False, doc="threshold rule, normalisation, input size"),
)

#: one row per inspected image (one verdict)
inspections = sa.Table(
    "inspections", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("image_index", sa.Integer, nullable=False, doc="position in its request"),
    sa.Column("source", sa.String(16), nullable=False, doc="serve | predict"),
    sa.Column("station", sa.String(200)),
    sa.Column("line", sa.String(200)),
    sa.Column("camera", sa.String(200)),
    sa.Column("part_id", sa.String(200)),
    sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id"), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("image_format", sa.String(16), nullable=False, doc="file suffix, e.g. png"),
    sa.Column("image_bytes", sa.Integer, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, doc="null when not finite"),
    sa.Column("normalized_score", sa.Float),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("n_regions", sa.Integer, nullable=False),
    sa.Column("regions", sa.JSON, nullable=False),
    sa.Column("label", sa.String(200), doc="the classifier's label, where one is served"),
    sa.Column("label_probability", sa.Float),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("details", sa.JSON, nullable=False,
              doc="the rest of the verdict (pixel threshold, classification, new fields)"),
    sa.Column("image_kept", sa.Boolean, nullable=False),
    sa.Column("heatmap_sha256", sa.String(64)),
    # revision 0002: the latest review (history in `reviews`)
    sa.Column("truth", sa.String(16), doc="good | defect, from the latest review"),
    sa.Column("defect_type", sa.String(200)),
    sa.Column("reviewed_at", UTCDateTime),
    sa.Column("reviewer", sa.String(200)),
    sa.UniqueConstraint("request_id", "image_index", name="uq_inspections_request"),
    sa.Index("ix_inspections_created_at", "created_at"),
    sa.Index("ix_inspections_verdict_id", "verdict", "id"),
    sa.Index("ix_inspections_verdict_created_at", "verdict", "created_at"),
    sa.Index("ix_inspections_part_id", "part_id"),
    sa.Index("ix_inspections_image_sha256", "image_sha256"),
    # revision 0002: small partial indexes for the queue, the reviewed list and its counts
    sa.Index("ix_inspections_queue", "id", sqlite_where=QUEUE, postgresql_where=QUEUE),
    sa.Index("ix_inspections_reviewed", "id", sqlite_where=REVIEWED,
             postgresql_where=REVIEWED),
    sa.Index("ix_inspections_reviewed_counts", "verdict", "truth", "image_kept",
             sqlite_where=REVIEWED, postgresql_where=REVIEWED),
)

#: revision 0002: every review decision, oldest first (the latest is copied to `inspections`)
reviews = sa.Table(
    "reviews", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("inspection_id", BigId, sa.ForeignKey("inspections.id"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("truth", sa.String(16), nullable=False),
    sa.Column("defect_type", sa.String(200)),
    sa.Column("note", sa.Text),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("api_key", sa.String(200), doc="name of the API key used, if any"),
    sa.Index("ix_reviews_inspection_id", "inspection_id"),
)
