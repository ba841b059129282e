"""A worker node's identity for the reconciler: its incarnation, its heartbeat, what it recovers at start.

:class:`NodeIdentity` is a worker bootstep (Celery's one way to give a worker something for its
lifetime). Each start of a worker is an *incarnation* of its node (rekku.reconciler): claims,
heartbeat keys and unacknowledged deliveries carry ``<pool@node>#<incarnation>``.

* Set up in the step's constructor, which Celery runs while it builds the worker and before the pool
  forks: the incarnation (pool processes inherit it), the tagging of unacknowledged deliveries, the
  first heartbeat, and the recovery of what an earlier start of the same node name left running or
  unacknowledged (a SIGKILLed node restarted by systemd, compose or Kubernetes). Before the fork on
  purpose: a thread doing database work or imports while a pool process is forked can leave that
  child a lock held forever (the C client's, an import's), and the child hangs on its first task.
* Started with the worker: a thread refreshes the heartbeat; stopped with it: the keys are removed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import bootsteps
from rekku_workers.heartbeat import beat, heartbeat_forever
from rekku_workers.owned_qos import tag_deliveries
from rekku_workers.recovery import recover_predecessors

from rekku.broker import broker_client
from rekku.settings import get_settings
from rekku.worker_identity import start_incarnation

log = logging.getLogger(__name__)


class NodeIdentity(bootsteps.StartStopStep):
    """Incarnation, heartbeat and predecessor recovery of one worker start (see the module docstring)."""

    label = "rekku node identity"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        if "#" in parent.hostname:  # it separates the node from the incarnation (rekku.worker_identity)
            raise ValueError(f"worker name {parent.hostname!r}: a node name may not contain '#'")
        self.settings = settings = get_settings()
        self.hostname = parent.hostname
        self.incarnation = start_incarnation()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        tag_deliveries(f"{self.hostname}#{self.incarnation}")
        try:  # before anything is consumed: a restarted node's successor never looks dead
            beat(broker_client(settings), self.hostname, self.incarnation, max(3, int(settings.worker_heartbeat_ttl)))
        except redis.RedisError:
            log.warning("could not write the first worker heartbeat", exc_info=True)
        try:
            recover_predecessors(self.hostname, self.incarnation, settings)
        except Exception:  # the reconciler recovers them once their heartbeat expires
            log.warning("could not recover %s's earlier runs", self.hostname, exc_info=True)

    def start(self, parent: Any) -> None:
        self._thread = threading.Thread(target=heartbeat_forever,
                                        args=(self.hostname, self._stop, self.settings, self.incarnation),
                                        name="rekku-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def info(self, parent: Any) -> dict:
        return {"rekku": {"incarnation": self.incarnation}}
