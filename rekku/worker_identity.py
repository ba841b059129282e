"""Which start of which worker ran an action: ``pool@node#incarnation``.

Each start of a worker process is an *incarnation* of its node (a random id made at start, inherited
by its pool processes). The action log records claims under it, so a node restarted under the same
name (systemd, compose, Kubernetes) tells its dead predecessor's runs from its own; the reconciler
(rekku.reconciler) and the worker's bootstep (rekku_workers.node) build on it. This module holds only the
identity, so the worker's claim can name it without importing the reconciler.
"""

from __future__ import annotations

import uuid

_incarnation: str | None = None


def start_incarnation() -> str:
    """A new identity for this start of the worker process (its pool children inherit it)."""
    global _incarnation
    _incarnation = uuid.uuid4().hex[:12]
    return _incarnation


def worker_id(hostname: str) -> str:
    """What the action log records as an action's worker: ``pool@node#incarnation`` in a worker."""
    return f"{hostname}#{_incarnation}" if _incarnation else hostname
