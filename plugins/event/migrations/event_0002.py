"""event plugin: the verified requester of each scheduled event.

``scheduled_events.requester`` keeps the request context the ``event`` action was accepted with
(interface, chat_id, thread_id, user_id, username: what the API token holder said). The event's
scheduled actions run with it when they are due; the payload's ``created_by`` (written by the model)
stays a label and never becomes the user. Rows made before this migration have no requester
(NULL): their reminders are still delivered, their scheduled actions are not run as anyone.

Revision ID: event_0002
Revises: event_0001
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import JSONType

revision = "event_0002"
down_revision = "event_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable, no default: NULL marks the rows whose requester was never recorded
    op.add_column("scheduled_events", sa.Column("requester", JSONType, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scheduled_events") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("requester")
