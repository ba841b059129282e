"""The action log: action_runs.lost_runs, how many runs of an action were lost with their worker
process (SIGKILL, the OOM killer, a crash). At REKKU_MAX_ATTEMPTS the action fails instead of being
delivered again, so a message that kills its process every time is not redelivered forever.

Revision ID: 0004_lost_runs (a name of its own: another 0004 may be written meanwhile; `upgrade`
goes to every head)
Revises: 0003
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_lost_runs"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("action_runs", sa.Column("lost_runs", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("action_runs", "lost_runs")
