"""records: the models and the inspections (one row per verdict)

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from flawscope.station.tables import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("first_seen", UTCDateTime, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
    )
    op.create_table(
        "inspections",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("image_index", sa.Integer, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("station", sa.String(200)),
        sa.Column("line", sa.String(200)),
        sa.Column("camera", sa.String(200)),
        sa.Column("part_id", sa.String(200)),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_format", sa.String(16), nullable=False),
        sa.Column("image_bytes", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("normalized_score", sa.Float),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("n_regions", sa.Integer, nullable=False),
        sa.Column("regions", sa.JSON, nullable=False),
        sa.Column("label", sa.String(200)),
        sa.Column("label_probability", sa.Float),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("image_kept", sa.Boolean, nullable=False),
        sa.Column("heatmap_sha256", sa.String(64)),
        sa.UniqueConstraint("request_id", "image_index", name="uq_inspections_request"),
    )
    op.create_index("ix_inspections_created_at", "inspections", ["created_at"])
    op.create_index("ix_inspections_verdict_id", "inspections", ["verdict", "id"])
    op.create_index("ix_inspections_verdict_created_at", "inspections",
                    ["verdict", "created_at"])
    op.create_index("ix_inspections_part_id", "inspections", ["part_id"])
    op.create_index("ix_inspections_image_sha256", "inspections", ["image_sha256"])


def downgrade() -> None:
    op.drop_table("inspections")
    op.drop_table("models")
