"""reviews: operators' decisions (good | defect) and the review queue

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from flawscope.station.tables import BigId, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# partial indexes, conditions written as the queries write them (frozen here, not imported)
QUEUE = sa.and_(sa.column("image_kept", sa.Boolean).is_(True), sa.column("reviewed_at").is_(None))
REVIEWED = sa.column("reviewed_at").is_not(None)



def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", BigId, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("truth", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(200)),
        sa.Column("note", sa.Text),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("api_key", sa.String(200)),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])
    # plain ADD COLUMN (no table copy, also in SQLite): nullable, no constraint
    for column in (sa.Column("truth", sa.String(16)), sa.Column("defect_type", sa.String(200)),
                   sa.Column("reviewed_at", UTCDateTime), sa.Column("reviewer", sa.String(200))):
        op.add_column("inspections", column)
    op.create_index("ix_inspections_queue", "inspections", ["id"],
                    sqlite_where=QUEUE, postgresql_where=QUEUE)
    op.create_index("ix_inspections_reviewed", "inspections", ["id"],
                    sqlite_where=REVIEWED, postgresql_where=REVIEWED)
    op.create_index("ix_inspections_reviewed_counts", "inspections",
                    ["verdict", "truth", "image_kept"],
                    sqlite_where=REVIEWED, postgresql_where=REVIEWED)


def downgrade() -> None:
    op.drop_index("ix_inspections_reviewed_counts", "inspections")
    op.drop_index("ix_inspections_reviewed", "inspections")
    op.drop_index("ix_inspections_queue", "inspections")
    with op.batch_alter_table("inspections") as batch:
        for name in ("reviewer", "reviewed_at", "defect_type", "truth"):
            batch.drop_column(name)
    op.drop_table("reviews")
