"""bio_manager plugin: what Rekku knows about each person (docs/plugins.md §2).

Every field but ``user_name`` holds JSON (lists, objects or text), merged by the plugin's rules.

Revision ID: bio_manager_0001
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import JSONType, UTCDateTime

revision = "bio_manager_0001"
down_revision = "0001"
branch_labels = ("bio_manager",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bio",
        sa.Column("id", sa.String(191), primary_key=True),
        sa.Column("known_as", JSONType),
        sa.Column("likes", JSONType),
        sa.Column("not_likes", JSONType),
        sa.Column("information", JSONType),
        sa.Column("past_events", JSONType),
        sa.Column("feelings", JSONType),
        sa.Column("contacts", JSONType),
        sa.Column("social_accounts", JSONType),
        sa.Column("privacy", JSONType),
        sa.Column("user_name", sa.String(255), index=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("last_accessed", UTCDateTime),
        sa.Column("last_update", UTCDateTime),
        sa.Column("update_count", sa.Integer, nullable=False, server_default="0"),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("bio")
