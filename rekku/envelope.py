"""What identifies a Celery message that asks for work, signed or not.

The signed envelope's id is set on the request by rekku.signing (which needs the optional 'signing'
extra); the worker's ``rekku.ingest`` task reads it through this module, which needs nothing, so a
base install names the attribute in one place only.
"""

from __future__ import annotations

from typing import Any

#: The request attribute rekku.signing sets to a verified envelope's id (never taken from the sender).
ENVELOPE_ATTR = "rekku_envelope"


def message_key(request: Any) -> str:
    """The idempotency key of a message without one of its own: a redelivered message answers the same
    and enqueues nothing twice. With signing on it is the signed envelope's id, since a replay may carry
    any task id; otherwise the task id."""
    envelope = getattr(request, ENVELOPE_ATTR, None)
    return f"signed:{envelope}" if envelope else f"celery-task:{request.id}"
