"""The conversation: incoming messages, and the feed of what is meant for the model.

Revision ID: 0005_conversation
Revises: 0004_lost_runs
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import JSONType, UTCDateTime

revision = "0005_conversation"
down_revision = "0004_lost_runs"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("interface", sa.String(64), nullable=False),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("message_id", sa.String(191)),
        sa.Column("user_id", sa.String(191), nullable=False),
        sa.Column("username", sa.String(255)),
        sa.Column("chat_name", sa.String(255)),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("reply_to_message_id", sa.String(191)),
        sa.Column("date", UTCDateTime, nullable=False),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("interface", "chat_id", "message_id", name="uq_messages_platform_id"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_messages_chat", "messages", ["interface", "chat_id", "thread_id", "id"])
    op.create_table(
        "feed_items",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("interface", sa.String(64), nullable=False, server_default=""),
        sa.Column("chat_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("action_id", sa.String(36)),
        sa.Column("dedupe_key", sa.String(191)),
        sa.Column("data", JSONType),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("dedupe_key", name="uq_feed_items_dedupe_key"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_feed_items_chat", "feed_items", ["interface", "chat_id", "thread_id", "id"])
    order = op.create_table("feed_order", sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                            mysql_charset="utf8mb4")
    op.bulk_insert(order, [{"id": 1}])


def downgrade() -> None:
    op.drop_table("feed_order")
    op.drop_index("ix_feed_items_chat", table_name="feed_items")
    op.drop_table("feed_items")
    op.drop_index("ix_messages_chat", table_name="messages")
    op.drop_table("messages")
