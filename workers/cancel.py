"""The worker's side of stopping a running action: a control command that interrupts only that action.

Celery's ``revoke(terminate=True)`` was tried first: billiard then remembers the signalled pool
process, and when that process later dies for real (SIGKILL, OOM) the loss is not reported, so
``reject_on_worker_lost`` never re-queues the next action it held. Instead the worker that runs
the action sends SIGUSR1 straight to the pool child (Celery's soft-time-limit signal, raised
inside the handler) or, on the threads pool, cancels the action's coroutine. The ingress's side,
the broadcast, is :func:`rekku.cancel.request_stop`.
"""

from __future__ import annotations

import os
import signal

from celery.worker import state as worker_state
from celery.worker.control import control_command
from rekku_workers import event_loop

from rekku.cancel import CANCEL_COMMAND


@control_command(name=CANCEL_COMMAND, args=[("action_id", str)], signature="<action_id>")
def rekku_cancel(state, action_id: str) -> dict:
    """Interrupt ``action_id`` if this worker runs it."""
    for request in list(worker_state.active_requests):
        if request.id != action_id:
            continue
        pid = request.worker_pid
        if pid and pid != os.getpid():
            os.kill(pid, signal.SIGUSR1)
            return {"ok": f"signalled pool process {pid}"}
        if event_loop.cancel(action_id):
            return {"ok": "cancelled its coroutine"}
        return {"ok": "running a synchronous handler here; it stops when it returns"}
    return {"ok": "not running here"}
