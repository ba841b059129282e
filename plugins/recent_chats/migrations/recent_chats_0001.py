"""recent_chats plugin: when each chat was last active.

Revision ID: recent_chats_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import JSONType, UTCDateTime

revision = "recent_chats_0001"
down_revision = "0001"
branch_labels = ("recent_chats",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recent_chats",
        sa.Column("interface", sa.String(64), primary_key=True, server_default=""),
        sa.Column("chat_id", sa.String(191), primary_key=True),
        sa.Column("last_active", UTCDateTime, nullable=False, index=True),
        sa.Column("metadata", JSONType),
        sa.Column("created_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("recent_chats")
