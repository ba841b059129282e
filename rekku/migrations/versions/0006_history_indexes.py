"""Chat history: the messages of a chat by time (rekku.prompt.chat_history reads the newest first).

Revision ID: 0006_history_indexes
Revises: 0005_conversation
Create Date: 2026-12-02
"""
from alembic import op

revision = "0006_history_indexes"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_chat_date", "messages", ["chat_id", "date"])


def downgrade() -> None:
    op.drop_index("ix_messages_chat_date", table_name="messages")
