"""Cross-cutting concerns of an action run, one small hook object each (Dramatiq's middleware idea).

The task body (rekku_workers.runner) passes every delivery through one :class:`HookChain`; a concern is added
by writing a class and listing it in ``rekku_workers.runner.HOOKS``, not by adding branches to the task. That
list is the only place the order is decided: each entry says why it sits where it is, and
:func:`check_order` refuses (when rekku_workers.runner is imported) a list that breaks one of its
:class:`OrderRule`. Hooks hand each other state only through the typed fields of :class:`Run` and the
context's ``progress_sink`` / ``attempt_source``, so what one hook leaves for another is written down.

What a delivery goes through, and what a hook that raises does to it:

* ``before_run``, hook by hook in list order. A raise ends that phase: later hooks get no
  ``before_run`` and the handler does not run. :class:`SkipRun` acknowledges the delivery (its
  outcome is ``after_skip``); any other exception (NotAuthorized, a database error) fails the action
  with that error (its outcome is ``after_failure``). Not isolated on purpose: an earlier hook decides
  whether the later ones, and the handler, have anything to do.
* Then one outcome per delivery — ``after_success``, ``after_failure``, ``before_retry`` (the
  handler asked to be retried; an outcome despite its name: the handler has run), ``after_cancel`` or
  ``after_skip`` — delivered to EVERY hook, in list order. That includes hooks whose ``before_run``
  never ran because an earlier one raised: the state they would have written is then None, which is
  why every :class:`Run` state field is optional. So a hook whose ``before_run`` ran always gets the
  matching call, and that call is its cleanup.
* Outcomes are isolated (Dramatiq's ``emit_after``): a hook whose outcome callback raises is logged
  once, at ERROR with the hook's class, the callback and the traceback, and the next hook is still
  called. The outcome stays the handler's: Celery is told what the handler did, not what a hook did.
  A failed write in the action log's callback no longer silences the metrics and the log line, and
  a failed requeue no longer cancels the retry. The row it could not write is left as it was when
  the error escaped: a ``queued`` one is re-enqueued by the reconciler, a ``running`` one once its
  worker stops. Unlike Dramatiq the outcomes go in list order, not reversed: the action log records
  an outcome before the observers (metrics, log line) report it.
* Only ``Exception`` is caught; ``SystemExit`` and ``KeyboardInterrupt`` (the worker stopping) pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rekku import feed
from rekku.action_log import shared_log
from rekku.context import ActionContext
from rekku.errors import NotAuthorized
from rekku.plugin_base import ActionSpec
from rekku.registry import get_registry
from rekku.settings import get_settings
from rekku.validation import authorization_error

if TYPE_CHECKING:
    from rekku_workers.claim import DeferredClaim

log = logging.getLogger("rekku.run")


class SkipRun(Exception):
    """Raised by a hook's ``before_run`` to acknowledge the task without running the handler."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Run:
    """One delivery of one action to one worker, and the state its hooks hand each other.

    The first five fields are the delivery. The others are written by one hook's ``before_run`` and
    read by later callbacks; each is None while its writer has not run (see the module docstring).
    Slots: a hook cannot hang untyped state on a run."""

    task: Any
    spec: ActionSpec
    action_id: str
    payload: dict
    context: ActionContext
    #: The run's deferred ``running`` write. Written by ActionLogHook.before_run; read by
    #: ProgressHook's sink (progress waits on it until it is written) and ActionLogHook's outcomes.
    claim: DeferredClaim | None = None
    #: ``time.perf_counter()`` when MetricsHook.before_run ran; its outcomes time the run from it.
    started_monotonic: float | None = None


class Hook:
    """No-op base: override the moments you care about (the module docstring says what a raise does)."""

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


class HookChain:
    """A run's hooks in their declared order, called as the module docstring says."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks: tuple[Hook, ...] = tuple(hooks)

    def before_run(self, run: Run) -> None:
        """Every hook's ``before_run`` until one raises; the raise is the caller's to turn into an outcome."""
        for hook in self.hooks:
            hook.before_run(run)

    def after_success(self, run: Run, result: Any) -> None:
        self._emit("after_success", run, result)

    def after_failure(self, run: Run, error: str) -> None:
        self._emit("after_failure", run, error)

    def before_retry(self, run: Run, error: str, countdown: float) -> None:
        self._emit("before_retry", run, error, countdown)

    def after_cancel(self, run: Run) -> None:
        self._emit("after_cancel", run)

    def after_skip(self, run: Run, reason: str) -> None:
        self._emit("after_skip", run, reason)

    def _emit(self, callback: str, run: Run, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, callback)(run, *args)
            except Exception:
                log.exception("hook %s.%s raised on action %s; the other hooks are called regardless",
                              type(hook).__name__, callback, run.action_id)


@dataclass(frozen=True)
class OrderRule:
    """In a run's hook list, ``earlier`` must come before ``later``, because ``why``."""

    earlier: type[Hook]
    later: type[Hook]
    why: str


class HookOrderError(ValueError):
    """A hook list breaks one of its order rules (or lists a hook twice, or misses one a rule names)."""


def check_order(hooks: Sequence[Hook], rules: Iterable[OrderRule]) -> None:
    """Raise :class:`HookOrderError` unless ``hooks`` holds each hook a rule names once, in the rules'
    order; the message names every rule broken, so one edit of the list can fix them all."""
    position: dict[type[Hook], int] = {}
    for index, hook in enumerate(hooks):
        if type(hook) in position:
            raise HookOrderError(f"{type(hook).__name__} is listed twice")
        position[type(hook)] = index
    broken = []
    for rule in rules:
        missing = ", ".join(cls.__name__ for cls in (rule.earlier, rule.later) if cls not in position)
        if missing or position[rule.earlier] > position[rule.later]:
            unlisted = f" ({missing} is not listed)" if missing else ""
            broken.append(f"{rule.earlier.__name__} must come before {rule.later.__name__}{unlisted}: {rule.why}")
    if broken:
        raise HookOrderError("; ".join(broken))


class AuthorizationHook(Hook):
    """Re-checks trainer-only and restricted actions in the worker: the ingress is not the only door."""

    def before_run(self, run: Run) -> None:

        denied = authorization_error(run.spec, vars(run.context), get_settings(), run.payload, get_registry())
        if denied:
            raise NotAuthorized(denied)


class ProgressHook(Hook):
    """Lets handlers report named steps: stored in the log and published as the task's state."""

    def before_run(self, run: Run) -> None:
        action_log = shared_log()

        def sink(progress: dict) -> None:
            claim = run.claim
            # progress is only stored on an action the log already calls running: before its claim is
            # written, the claim's write (or the run's end) carries it
            if claim is None or not claim.hold_progress(progress):
                action_log.set_progress(run.action_id, progress)
            try:
                run.task.update_state(task_id=run.action_id, state="PROGRESS", meta=progress)
            except Exception:  # the result backend is a nicety here; the log has it
                log.debug("could not publish progress of %s", run.action_id, exc_info=True)

        run.context.progress_sink = sink


class LoggingHook(Hook):
    """One log line per outcome, with the action id and type."""

    def after_success(self, run: Run, result: Any) -> None:
        log.info("action %s (%s) succeeded", run.action_id, run.spec.type)

    def after_failure(self, run: Run, error: str) -> None:
        log.warning("action %s (%s) failed: %s", run.action_id, run.spec.type, error)

    def after_skip(self, run: Run, reason: str) -> None:
        log.info("action %s (%s) not run: %s", run.action_id, run.spec.type, reason)


class FailureFeedHook(Hook):
    """Tells the model of the chat an action came from that the action failed for good: a ``failure``
    item of the feed (rekku.feed), once per action. An action with no chat has no model listening;
    its caller reads the failure from the action's state."""

    def after_failure(self, run: Run, error: str) -> None:
        ctx = run.context
        if not ctx.chat_id:
            return
        chat = {"interface": ctx.interface, "chat_id": ctx.chat_id, "thread_id": ctx.thread_id}
        feed.append_now([feed.NewItem.about(feed.FAILURE, chat, {"action_type": run.spec.type, "error": error},
                                            action_id=run.action_id, dedupe_key=f"failure:{run.action_id}")])
