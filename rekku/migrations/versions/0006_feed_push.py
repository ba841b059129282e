"""The model webhook's cursor: how far the feed has been pushed, and the item being retried.

Revision ID: 0006_feed_push
Revises: 0005_conversation
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import UTCDateTime

revision = "0006_feed_push"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    cursor = op.create_table(
        "feed_push",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_id", BigId, nullable=False, server_default="0"),
        sa.Column("failing_id", BigId),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("last_error", sa.String(500)),
        sa.Column("updated_at", UTCDateTime),
        mysql_charset="utf8mb4",
    )
    op.bulk_insert(cursor, [{"id": 1, "last_id": 0, "attempts": 0}])


def downgrade() -> None:
    op.drop_table("feed_push")
