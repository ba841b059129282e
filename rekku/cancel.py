"""Stopping a running action, the ingress's side: a broadcast that only the worker running it acts on
(the control command is :mod:`rekku_workers.cancel`, which says why it is not Celery's revoke)."""

from __future__ import annotations

from celery import Celery

#: Name of the broadcast command (``app.control.broadcast(CANCEL_COMMAND, ...)``).
CANCEL_COMMAND = "rekku_cancel"


def request_stop(app: Celery, action_id: str) -> None:
    """Ask every worker to interrupt ``action_id`` (only the one running it acts)."""
    app.control.broadcast(CANCEL_COMMAND, arguments={"action_id": action_id})
