"""Listing actions (GET /v1/actions): newest first by (created_at, id), alone or within a chat, status or type.

The keyset of the list is (created_at, id), so each filter has an index that ends with it and a page is a
range read, never a sort. ``(type, created_at, id)`` starts with ``type``, so it replaces the plain index
on ``type`` (one index less to write per action); the chat's index (the prompt's history reads it too)
gets ``id`` at its end. A batch is a few rows, found on ``ix_action_runs_batch_id``.

Revision ID: 0006_action_list_indexes
Revises: 0005_conversation
Create Date: 2026-11-30
"""
from alembic import op

revision = "0006_action_list_indexes"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_action_runs_created", "action_runs", ["created_at", "id"])
    op.create_index("ix_action_runs_status_created", "action_runs", ["status", "created_at", "id"])
    op.create_index("ix_action_runs_type_created", "action_runs", ["type", "created_at", "id"])
    op.drop_index("ix_action_runs_type", table_name="action_runs")
    op.drop_index("ix_action_runs_chat_created", table_name="action_runs")
    op.create_index("ix_action_runs_chat_created", "action_runs", ["chat_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_action_runs_chat_created", table_name="action_runs")
    op.create_index("ix_action_runs_chat_created", "action_runs", ["chat_id", "created_at"])
    op.create_index("ix_action_runs_type", "action_runs", ["type"])
    op.drop_index("ix_action_runs_type_created", table_name="action_runs")
    op.drop_index("ix_action_runs_status_created", table_name="action_runs")
    op.drop_index("ix_action_runs_created", table_name="action_runs")
