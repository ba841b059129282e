"""Retention: action_batches by creation time, so the pruner (rekku/retention.py) walks old batches by
an index range instead of reading every batch (their ids are random UUIDs).

Revision ID: 0006_retention_indexes
Revises: 0005_conversation
Create Date: 2026-11-30
"""
from alembic import op

revision = "0006_retention_indexes"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_action_batches_created", "action_batches", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_action_batches_created", table_name="action_batches")
