"""ai_diary plugin: Rekku's personal diary (docs/plugins.md §2, plus the missing ``involved_users``).

Revision ID: ai_diary_0001
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import JSONType, UTCDateTime

revision = "ai_diary_0001"
down_revision = "0001"
branch_labels = ("ai_diary",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ai_diary",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("content", sa.Text),
        sa.Column("personal_thought", sa.Text),
        sa.Column("emotions", JSONType),
        sa.Column("interaction_summary", sa.Text, nullable=False),
        sa.Column("timestamp", UTCDateTime, nullable=False),
        sa.Column("interface", sa.String(64)),
        sa.Column("chat_id", sa.String(191)),
        sa.Column("thread_id", sa.String(191)),
        sa.Column("user_message", sa.Text),
        sa.Column("context_tags", JSONType),
        sa.Column("involved_users", JSONType),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_ai_diary_timestamp", "ai_diary", ["timestamp"])


def downgrade() -> None:
    op.drop_table("ai_diary")
