"""The model loop's per-chat cursor on the feed (rekku/model_loop.py).

Revision ID: 0006_model_turns
Revises: 0005_conversation
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import UTCDateTime

revision = "0006_model_turns"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "model_turns",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("interface", sa.String(64), nullable=False),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("read_upto", BigId, nullable=False, server_default="0"),
        sa.Column("pending_upto", BigId),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("interface", "chat_id", "thread_id", name="uq_model_turns_chat"),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("model_turns")
