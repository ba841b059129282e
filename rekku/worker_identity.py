"""Which start of which worker ran an action: ``pool@node#incarnation``.

Each start of a worker process is an *incarnation* of its node (a random id made at start, inherited
by its pool processes). The action log records claims under it, so a node restarted under the same
name (systemd, compose, Kubernetes) tells its dead predecessor's runs from its own; the reconciler
(rekku.reconciler) and the worker's bootstep (rekku_workers.node) build on it. This module holds only the
identity, so the worker's claim can name it without importing the reconciler.
"""

from __future__ import annotations

import uuid

#: Redis key of a worker's heartbeat: ``rekku:worker:<hostname>`` (the node, holding its newest
#: incarnation) and ``rekku:worker:<hostname>#<incarnation>`` (one start of it); both expire when it stops.
HEARTBEAT_PREFIX = "rekku:worker:"
#: Sorted set of the workers (``pool@node``) that beat lately, scored by their last beat's time: who to
#: look up (a heartbeat key each) without scanning the broker's keys (rekku/metrics_gauges.py).
WORKERS_KEY = "rekku:workers"
#: Workers whose last beat is older than this (seconds) leave :data:`WORKERS_KEY`.
WORKERS_KEPT_SECONDS = 3600

_incarnation: str | None = None


def start_incarnation() -> str:
    """A new identity for this start of the worker process (its pool children inherit it)."""
    global _incarnation
    _incarnation = uuid.uuid4().hex[:12]
    return _incarnation


def worker_id(hostname: str) -> str:
    """What the action log records as an action's worker: ``pool@node#incarnation`` in a worker."""
    return f"{hostname}#{_incarnation}" if _incarnation else hostname
