"""The action log: an indexed chat_id on action_runs, so a chat's history is an index range scan.

Before, the prompt's chat history filtered every action of the last days on a JSON path of
``context``; the column holds the same value (its first 255 characters) and is filled for the rows
already there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import CHAT_ID_LENGTH, JSONType

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("action_runs", sa.Column("chat_id", sa.String(CHAT_ID_LENGTH)))
    runs = sa.table("action_runs", sa.column("context", JSONType), sa.column("chat_id", sa.String))
    op.execute(sa.update(runs).where(runs.c.context.isnot(None))
               .values(chat_id=sa.func.substr(runs.c.context["chat_id"].as_string(), 1, CHAT_ID_LENGTH)))
    op.create_index("ix_action_runs_chat_created", "action_runs", ["chat_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_action_runs_chat_created", table_name="action_runs")
    op.drop_column("action_runs", "chat_id")
