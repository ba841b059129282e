"""Cross-cutting concerns of an action run, one small hook object each (Dramatiq's middleware idea).

The task body (rekku.runner) calls every hook of its ``HOOKS`` list at the same points; a concern is
added by writing a class and listing it there, not by adding branches to the task.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rekku.action_log import ActionLog, shared_log
from rekku.context import ActionContext
from rekku.errors import NotAuthorized
from rekku.models import FINAL_STATES, utcnow
from rekku.plugin_base import ActionSpec
from rekku.settings import get_settings

log = logging.getLogger("rekku.run")


class SkipRun(Exception):
    """Raised by a hook's ``before_run`` to acknowledge the task without running the handler."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Run:
    """One delivery of one action to one worker."""

    task: Any
    spec: ActionSpec
    action_id: str
    payload: dict
    context: ActionContext
    extras: dict = field(default_factory=dict)


class Hook:
    """No-op base: override the moments you care about."""

    def before_run(self, run: Run) -> None:
        """Before the handler; raise SkipRun to skip it, any other error fails the action."""

    def after_success(self, run: Run, result: Any) -> None:
        """The handler returned ``result``."""

    def after_failure(self, run: Run, error: str) -> None:
        """The action failed for good."""

    def before_retry(self, run: Run, error: str, countdown: float) -> None:
        """The action will be retried in ``countdown`` seconds."""

    def after_cancel(self, run: Run) -> None:
        """The action was stopped at the user's request."""

    def after_skip(self, run: Run, reason: str) -> None:
        """The delivery was acknowledged without running the handler."""


class ActionLogHook(Hook):
    """Moves the action through its states in the log; a finished action is never run again.

    The check that decides whether to run is a read (is the action final or cancelled?); the write
    that marks it ``running`` (attempts + 1, worker, started_at) is committed on a helper thread
    while the handler starts, and every later state change waits for it. That keeps a database
    commit (an fsync on MariaDB) off the path to the handler without changing what can happen:
    the conditional UPDATE never moves a final action, and a redelivery may re-run a ``running``
    one, exactly as a synchronous claim would allow. When the handler is done before the claim
    thread even started, the claim is dropped and one write records the whole run: half the
    commits for quick actions, which is what several processes sharing SQLite contend on.
    """

    @property
    def log(self) -> ActionLog:
        return shared_log()

    def before_run(self, run: Run) -> None:
        state = self.log.state(run.action_id)
        if state is None:
            raise SkipRun("unknown action (not in the action log)")
        status, cancel_requested = state
        if status in FINAL_STATES:
            raise SkipRun(f"already {status}")
        if cancel_requested:  # cancel asked while its previous holder died
            self.log.cancelled(run.action_id, "cancelled")
            raise SkipRun("cancelled")
        run.extras["started"] = utcnow()
        claim = _claimer().submit(self.log.claim, run.action_id, run.context.worker or "?")
        run.extras["claim"] = claim
        run.context._attempt_loader = lambda: (claim.result(), self.log.attempts(run.action_id))[1]

    @staticmethod
    def _claimed(run: Run) -> bool:
        """Wait for the claim; False when it never started (the handler was quicker) and is now dropped."""
        claim = run.extras.get("claim")
        if claim is None or claim.cancel():
            return False
        claim.result()
        return True

    def after_success(self, run: Run, result: Any) -> None:
        if self._claimed(run):
            self.log.succeed(run.action_id, result)
        else:  # a quick action: claim and result in one write
            self.log.claim_and_finish(run.action_id, run.context.worker or "?", run.extras["started"],
                                      succeeded=True, result=result)

    def after_failure(self, run: Run, error: str) -> None:
        if self._claimed(run):
            self.log.fail(run.action_id, error)
        else:
            self.log.claim_and_finish(run.action_id, run.context.worker or "?", run.extras["started"],
                                      succeeded=False, error=error)

    def before_retry(self, run: Run, error: str, countdown: float) -> None:
        run.context.attempt  # noqa: B018 - retries are counted by the claim: make sure it is written
        self._claimed(run)
        self.log.requeue(run.action_id, f"{error} (retrying in {countdown:g} s)")

    def after_cancel(self, run: Run) -> None:
        self._claimed(run)
        self.log.cancelled(run.action_id, "cancelled while running")


_claim_pool: tuple[int, ThreadPoolExecutor] | None = None


def _claimer() -> ThreadPoolExecutor:
    """The process's claim thread (made again in a forked child, which has no threads)."""
    global _claim_pool
    if _claim_pool is None or _claim_pool[0] != os.getpid():
        _claim_pool = (os.getpid(), ThreadPoolExecutor(max_workers=4, thread_name_prefix="rekku-claim"))
    return _claim_pool[1]


class AuthorizationHook(Hook):
    """Re-checks trainer-only and restricted actions in the worker: the ingress is not the only door."""

    def before_run(self, run: Run) -> None:
        from rekku.validation import authorization_error

        denied = authorization_error(run.spec, vars(run.context), get_settings())
        if denied:
            raise NotAuthorized(denied)


class ProgressHook(Hook):
    """Lets handlers report named steps: stored in the log and published as the task's state."""

    def before_run(self, run: Run) -> None:
        action_log = shared_log()

        def sink(progress: dict) -> None:
            claim = run.extras.get("claim")
            if claim is not None and not claim.cancelled():
                claim.result()  # progress is only shown on an action the log already calls running
            action_log.set_progress(run.action_id, progress)
            try:
                run.task.update_state(task_id=run.action_id, state="PROGRESS", meta=progress)
            except Exception:  # the result backend is a nicety here; the log has it
                log.debug("could not publish progress of %s", run.action_id, exc_info=True)

        run.context._progress_sink = sink


class LoggingHook(Hook):
    """One log line per outcome, with the action id and type."""

    def after_success(self, run: Run, result: Any) -> None:
        log.info("action %s (%s) succeeded", run.action_id, run.spec.type)

    def after_failure(self, run: Run, error: str) -> None:
        log.warning("action %s (%s) failed: %s", run.action_id, run.spec.type, error)

    def after_skip(self, run: Run, reason: str) -> None:
        log.info("action %s (%s) not run: %s", run.action_id, run.spec.type, reason)
