"""The action log's part in a run: the deferred claim, the hook that moves the action through its
states, and the count of runs lost with their pool process.

Kept apart from rekku_workers.hooks (the hook interface and the small hooks) because this is the one hook
whose writes decide what may run again; the reconciler and the worker's main process rely on it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request
from rekku_workers.hooks import Hook, Run, SkipRun

from rekku.action_log import ActionLog, lost_error, shared_log
from rekku.models import FINAL_STATES, utcnow
from rekku.settings import get_settings
from rekku.worker_identity import worker_id

log = logging.getLogger("rekku.run")


#: How long a run goes unrecorded as ``running``. One that ends sooner (most: a no-op takes well under
#: a millisecond) is written once, claim, last progress and result together; a longer one is claimed then.
CLAIM_DELAY = 0.01


class DeferredClaim:
    """The write that marks a run ``running`` (attempts + 1, worker, started_at): made by the process's
    claimer thread once :data:`CLAIM_DELAY` has passed, at once by :meth:`write` when something needs
    the row (the attempt number), or never when the run ends first: then its end claims too. Progress
    reported before the claim is written rides along with whichever write comes first."""

    def __init__(self, action_log: ActionLog, action_id: str, worker: str) -> None:
        self.started = utcnow()
        self.due = time.monotonic() + CLAIM_DELAY
        self.progress: dict | None = None
        self.action_id = action_id
        self._log, self._worker = action_log, worker
        self._lock = threading.Lock()
        self._ended = self._written = False
        _claimer().add(self)

    @property
    def settled(self) -> bool:
        return self._ended or self._written

    def write(self) -> None:
        """Write the claim, unless it is written or the run is over."""
        with self._lock:
            if self._ended or self._written:
                return
            self._log.claim(self.action_id, self._worker)
            if self.progress is not None:
                self._log.set_progress(self.action_id, self.progress)
            self._written = True

    def hold_progress(self, progress: dict) -> bool:
        """Keep ``progress`` for the claim's write; False when the claim is already written (write it now)."""
        with self._lock:
            if self._written:
                return False
            self.progress = progress
            return True

    def end(self) -> bool:
        """The run is over: True when the claim was written (its end is a plain finish), False when the
        end must record the claim too."""
        with self._lock:
            self._ended = True
            return self._written


class _Claimer:
    """The process's thread that writes the deferred claims that are due. While runs keep coming it
    looks every :data:`CLAIM_DELAY` and starting a run only appends to a deque: waking the thread
    for each run (an Event's notify, then a GIL hand-off) cost a fifth, then a tenth, of a no-op
    action's worker time (py-spy, bench (b)). After :data:`IDLE_LOOKS` looks with nothing to do it
    sleeps until the next run wakes it, so an idle process does not poll."""

    #: Empty looks in a row (a second at CLAIM_DELAY) before the thread waits to be woken.
    IDLE_LOOKS = 100

    def __init__(self) -> None:
        self._pending: collections.deque[DeferredClaim] = collections.deque()
        self._wake = threading.Event()
        self._sleeping = False
        threading.Thread(target=self._loop, name="rekku-claim", daemon=True).start()

    def add(self, claim: DeferredClaim) -> None:
        self._pending.append(claim)
        if self._sleeping:  # set before the thread's last look at the deque: a run added after it wakes it
            self._wake.set()

    def _loop(self) -> None:
        pending = self._pending
        empty = 0
        while True:
            if not pending:
                empty += 1
                if empty >= self.IDLE_LOOKS:
                    self._sleeping = True
                    if not pending:
                        self._wake.wait()
                    self._wake.clear()
                    self._sleeping = False
                    empty = 0
            else:
                empty = 0
            time.sleep(CLAIM_DELAY)
            now = time.monotonic()
            while pending and (pending[0].settled or pending[0].due <= now):
                claim = pending.popleft()
                try:
                    claim.write()
                except Exception:  # the run's end records the claim instead
                    log.warning("could not record that action %s is running", claim.action_id, exc_info=True)


_claimers: dict[int, _Claimer] = {}


def _claimer() -> _Claimer:
    """The process's claimer (made again in a forked child, which has no threads)."""
    pid = os.getpid()
    claimer = _claimers.get(pid)
    if claimer is None:
        claimer = _claimers[pid] = _Claimer()
    return claimer


class ActionLogHook(Hook):
    """Moves the action through its states in the log; a finished action is never run again.

    The check that decides whether to run is a read (is the action final or cancelled?); the write
    that marks it ``running`` is a :class:`DeferredClaim`, and every later state change comes after
    it. That keeps database commits off the path to the handler without changing what can happen: the
    conditional UPDATE never moves a final action, and a redelivery may re-run a ``running`` one,
    exactly as a synchronous claim would allow. A run that ends within :data:`CLAIM_DELAY` is recorded
    by ONE write (claim, progress, result) instead of three, which is what several processes sharing
    SQLite contend on. The price: a worker killed within that time leaves no count in ``attempts`` —
    so a delivery of an action that was delivered before (running when its holder died, retried,
    recovered from a dead node) writes its claim before the handler runs, and the worker's main
    process counts a pool process lost before its claim (:class:`ActionRequest`).

    Poison messages: an action whose runs were lost with their worker process ``REKKU_MAX_ATTEMPTS``
    times fails instead of running again (counted in ``lost_runs`` where the loss is seen; checked
    here too, so no delivery of it runs once the bound is reached).

    The claim records the worker as ``pool@node#incarnation`` (rekku.worker_identity): a node restarted
    under the same name tells its predecessor's runs from its own.
    """

    @property
    def log(self) -> ActionLog:
        return shared_log()

    def before_run(self, run: Run) -> None:
        state = self.log.state(run.action_id)
        if state is None:
            raise SkipRun("unknown action (not in the action log)")
        if state.status in FINAL_STATES:
            raise SkipRun(f"already {state.status}")
        if state.cancel_requested:  # cancel asked while its previous holder died
            self.log.cancelled(run.action_id, "cancelled")
            raise SkipRun("cancelled")
        limit = get_settings().max_attempts
        if state.lost_runs >= limit:  # a poison message: its processes kept dying
            self.log.fail_unfinished(run.action_id, lost_error(state.lost_runs, limit))
            raise SkipRun(f"its worker process died {state.lost_runs} times running it")
        claim = run.claim = DeferredClaim(self.log, run.action_id, worker_id(run.context.worker or "?"))
        if state.delivered_before:  # not the hot path: count this run before the handler can kill its process
            claim.write()
        run.context.attempt_source = lambda: (claim.write(), self.log.attempts(run.action_id))[1]

    def _end(self, run: Run, *, succeeded: bool, result: Any = None, error: str | None = None) -> None:
        claim = run.claim  # None: this hook's before_run did not make one (it skipped, or raised)
        if claim is not None and claim.end():
            if succeeded:
                self.log.succeed(run.action_id, result)
            else:
                self.log.fail(run.action_id, error or "")
        else:
            started = claim.started if claim else utcnow()
            self.log.claim_and_finish(run.action_id, worker_id(run.context.worker or "?"), started,
                                      succeeded=succeeded,
                                      result=result, error=error, progress=claim.progress if claim else None)

    def after_success(self, run: Run, result: Any) -> None:
        self._end(run, succeeded=True, result=result)

    def after_failure(self, run: Run, error: str) -> None:
        self._end(run, succeeded=False, error=error)

    @staticmethod
    def _write_claim(run: Run) -> None:
        if run.claim is not None:
            run.claim.write()

    def before_retry(self, run: Run, error: str, countdown: float) -> None:
        self._write_claim(run)  # retries are counted by the claim: make sure it is written
        self.log.requeue(run.action_id, f"{error} (retrying in {countdown:g} s)")

    def after_cancel(self, run: Run) -> None:
        self._write_claim(run)
        self.log.cancelled(run.action_id, "cancelled while running")


class ActionRequest(Request):
    """The worker's main process's view of one action delivery (``rekku.action.*`` tasks use it): when
    the pool process running it dies (SIGKILL, the OOM killer, a crash), the run is counted as lost
    before Celery puts the message back (``task_reject_on_worker_lost``), so the next delivery sees
    it; at ``REKKU_MAX_ATTEMPTS`` lost runs the action fails and that delivery only acknowledges it.
    Only this rare path writes: a run that ends normally costs nothing here."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt))
            and not (getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)))
        if lost:
            limit = get_settings().max_attempts
            try:
                count = shared_log().record_lost(self.id, worker_id(self.hostname), limit)
            except Exception:  # the reconciler and the claim still bound it; never break the worker
                log.warning("could not count the lost run of action %s", self.id, exc_info=True)
            else:
                if count >= limit:
                    log.error("action %s failed: %s", self.id, lost_error(count, limit))
                elif count:
                    log.warning("action %s: its worker process died while running it (%d of %d)",
                                self.id, count, limit)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
