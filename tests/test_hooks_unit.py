"""The hook chain in-process (no broker, no worker, milliseconds): outcome callbacks are isolated,
hooks run in the order their list declares, and the state one hook leaves for another is typed.

The action log is replaced by a small in-memory one: what is tested here is what the hooks hand each
other, not the SQL (the end-to-end and reliability tests run the same hooks against real databases).
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import rekku_workers.claim
import rekku_workers.hooks
from celery.exceptions import Retry
from rekku_workers import runner
from rekku_workers.claim import ActionLogHook
from rekku_workers.hooks import Hook, HookChain, HookOrderError, OrderRule, ProgressHook, Run, SkipRun, check_order
from rekku_workers.run_metrics import RUN_METRICS, MetricsHook

from rekku.action_log import RunState
from rekku.errors import NotAuthorized, TransientError
from rekku.plugin_base import ActionSpec
from tests.support import wait_until

SPEC = ActionSpec(type="unit_echo", plugin="unit")


class FakeTask:
    """What the runner and the hooks use of a bound Celery task."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(hostname="unit@test")
        self.states: list[dict] = []

    def update_state(self, task_id: str, state: str, meta: dict) -> None:
        self.states.append(meta)

    def retry(self, countdown: float, max_retries: Any, exc: Exception) -> Retry:
        return Retry(exc=exc, when=countdown)


class Recorder(Hook):
    """Writes each call it gets, as (name, callback), to a shared list."""

    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name, self.calls = name, calls

    def _note(self, callback: str) -> None:
        self.calls.append((self.name, callback))

    def before_run(self, run: Run) -> None:
        self._note("before_run")

    def after_success(self, run: Run, result: Any) -> None:
        self._note("after_success")

    def after_failure(self, run: Run, error: str) -> None:
        self._note("after_failure")

    def before_retry(self, run: Run, error: str, countdown: float) -> None:
        self._note("before_retry")

    def after_cancel(self, run: Run) -> None:
        self._note("after_cancel")

    def after_skip(self, run: Run, reason: str) -> None:
        self._note("after_skip")


class Exploding(Hook):
    """Every outcome callback raises."""

    def _boom(self, *args: Any) -> None:
        raise RuntimeError("hook bug")

    after_success = after_failure = before_retry = after_cancel = after_skip = _boom


class Refusing(Recorder):
    def __init__(self, calls: list[tuple[str, str]], error: Exception) -> None:
        super().__init__("refusing", calls)
        self.error = error

    def before_run(self, run: Run) -> None:
        self._note("before_run")
        raise self.error


def _run(monkeypatch: pytest.MonkeyPatch, hooks: list[Hook], handler: Any = None) -> Any:
    """One delivery through the runner with ``hooks`` instead of the real list; the handler's outcome
    (or the exception the task raises, which Celery would record)."""
    monkeypatch.setattr(runner, "HOOKS", HookChain(hooks))
    monkeypatch.setattr(runner, "invoke_handler", handler or (lambda spec, payload, ctx: {"ok": True}))
    try:
        return runner.execute(FakeTask(), SPEC, "act-1", {}, {"chat_id": "c1"})
    except (runner.ActionFailed, Retry) as exc:
        return exc


def _transient(spec: ActionSpec, payload: dict, ctx: Any) -> Any:
    raise TransientError("busy", retry_after=1)


def _broken(spec: ActionSpec, payload: dict, ctx: Any) -> Any:
    raise ValueError("bad input")


@pytest.mark.parametrize("outcome, handler, before_raises", [
    ("after_success", None, None),
    ("after_failure", _broken, None),
    ("before_retry", _transient, None),
    ("after_skip", None, SkipRun("already succeeded")),
    ("after_failure", None, NotAuthorized("not a trainer")),
])
def test_a_raising_outcome_callback_is_logged_once_and_every_other_hook_still_gets_the_outcome(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, outcome: str, handler: Any,
        before_raises: Exception | None) -> None:
    calls: list[tuple[str, str]] = []
    hooks: list[Hook] = [Recorder("first", calls), Exploding(), Recorder("last", calls)]
    if before_raises is not None:
        hooks.append(Refusing(calls, before_raises))
    with caplog.at_level(logging.DEBUG, logger="rekku.run"):
        _run(monkeypatch, hooks, handler)
    assert [c for c in calls if c[1] == outcome] == [(h.name, outcome) for h in hooks if isinstance(h, Recorder)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"Exploding.{outcome}" in errors[0].getMessage() and "act-1" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError


def test_the_outcome_is_the_handlers_whatever_a_hook_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run(monkeypatch, [Exploding()]) == {"status": "succeeded"}
    assert isinstance(_run(monkeypatch, [Exploding()], _transient), Retry)  # the retry is not lost
    failed = _run(monkeypatch, [Exploding()], _broken)
    assert isinstance(failed, runner.ActionFailed) and str(failed) == "ValueError: bad input"


def test_a_before_run_that_raises_stops_the_later_ones_and_every_hook_gets_the_outcome(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    ran: list[bool] = []
    hooks = [Recorder("first", calls), Refusing(calls, NotAuthorized("no")), Recorder("last", calls)]
    failed = _run(monkeypatch, hooks, lambda spec, payload, ctx: ran.append(True))
    assert isinstance(failed, runner.ActionFailed) and not ran
    assert calls == [("first", "before_run"), ("refusing", "before_run"),
                     ("first", "after_failure"), ("refusing", "after_failure"), ("last", "after_failure")]


@pytest.mark.parametrize("handler, outcome", [(None, "after_success"), (_broken, "after_failure"),
                                              (_transient, "before_retry")])
def test_hooks_are_called_in_the_order_their_list_declares(monkeypatch: pytest.MonkeyPatch, handler: Any,
                                                             outcome: str) -> None:
    calls: list[tuple[str, str]] = []
    names = ["zeta", "alpha", "mid"]  # neither sorted nor reversed: only the list says this order
    _run(monkeypatch, [Recorder(name, calls) for name in names], handler)
    assert calls == [(name, "before_run") for name in names] + [(name, outcome) for name in names]


def test_the_workers_hook_list_keeps_every_order_rule() -> None:
    assert [type(h).__name__ for h in runner.HOOKS.hooks] == [
        "ActionLogHook", "AuthorizationHook", "ProgressHook", "FailureFeedHook", "MetricsHook", "LoggingHook"]
    check_order(runner.HOOKS.hooks, runner.ORDER_RULES)


@pytest.mark.parametrize("rule", runner.ORDER_RULES, ids=lambda r: f"{r.earlier.__name__}<{r.later.__name__}")
def test_a_hook_list_that_breaks_a_rule_is_refused_with_the_reason(rule: OrderRule) -> None:
    hooks = list(runner.HOOKS.hooks)
    i = next(n for n, h in enumerate(hooks) if type(h) is rule.earlier)
    j = next(n for n, h in enumerate(hooks) if type(h) is rule.later)
    hooks[i], hooks[j] = hooks[j], hooks[i]
    with pytest.raises(HookOrderError, match=rule.why):
        check_order(hooks, runner.ORDER_RULES)


def test_a_hook_listed_twice_or_missing_is_refused() -> None:
    hooks = list(runner.HOOKS.hooks)
    with pytest.raises(HookOrderError, match="twice"):
        check_order(hooks + [hooks[-1]], runner.ORDER_RULES)
    with pytest.raises(HookOrderError, match="ActionLogHook is not listed"):
        check_order(hooks[1:], runner.ORDER_RULES)


class MemoryLog:
    """The action log calls a run makes, kept in memory."""

    def __init__(self) -> None:
        self.claimed = False
        self.progress: dict | None = None
        self.finished: dict | None = None

    def state(self, action_id: str) -> RunState:
        return RunState("queued", False, 0, False)

    def claim(self, action_id: str, worker: str) -> bool:
        self.claimed = True
        return True

    def attempts(self, action_id: str) -> int:
        return 1 if self.claimed else 0

    def set_progress(self, action_id: str, progress: dict) -> None:
        self.progress = progress

    def succeed(self, action_id: str, result: Any) -> None:
        self.finished = {"succeeded": True, "result": result, "progress": self.progress}

    def claim_and_finish(self, action_id: str, worker: str, started: Any, *, succeeded: bool, result: Any = None,
                         error: str | None = None, progress: dict | None = None) -> None:
        self.finished = {"succeeded": succeeded, "result": result, "progress": progress or self.progress}


class Witness(Hook):
    """Keeps the run as the outcome callbacks see it."""

    run: Run | None = None

    def after_success(self, run: Run, result: Any) -> None:
        self.run = run


def test_the_state_the_before_hooks_write_is_typed_and_reaches_the_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = MemoryLog()
    monkeypatch.setattr(rekku_workers.claim, "shared_log", lambda: memory)
    monkeypatch.setattr(rekku_workers.hooks, "shared_log", lambda: memory)
    timed: list[tuple[str, str, float]] = []
    monkeypatch.setattr(RUN_METRICS, "add", lambda kind, status, elapsed: timed.append((kind, status, elapsed)))

    def handler(spec: ActionSpec, payload: dict, ctx: Any) -> dict:
        ctx.report_progress("halfway", n=1)
        time.sleep(0.02)
        return {"attempt": ctx.attempt}

    witness = Witness()
    assert _run(monkeypatch, [ActionLogHook(), ProgressHook(), MetricsHook(), witness], handler) == {
        "status": "succeeded"}
    run = witness.run
    assert run is not None and not hasattr(run, "extras")
    assert isinstance(run.claim, rekku_workers.claim.DeferredClaim)  # made by the action log's before_run ...
    assert run.claim.progress == {"step": "halfway", "n": 1}  # ... held the progress reported before it was written
    assert run.context.progress_sink is not None and run.context.attempt_source is not None
    assert memory.claimed and memory.finished == {  # asking the attempt wrote the claim; the end used the claim
        "succeeded": True, "result": {"attempt": 1}, "progress": {"step": "halfway", "n": 1}}
    assert isinstance(run.started_monotonic, float)  # MetricsHook timed the run from its own before_run
    assert timed and timed[0][:2] == ("unit_echo", "succeeded") and timed[0][2] >= 0.02
    with pytest.raises(AttributeError):
        run.extras = {}  # type: ignore[attr-defined]  # no untyped state can be hung on a run


def test_a_hook_whose_before_run_never_ran_gets_its_outcome_with_its_state_unset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[tuple[str, str, float]] = []
    monkeypatch.setattr(RUN_METRICS, "add", lambda kind, status, elapsed: timed.append((kind, status, elapsed)))
    calls: list[tuple[str, str]] = []
    _run(monkeypatch, [Refusing(calls, NotAuthorized("no")), MetricsHook()])
    assert timed == [("unit_echo", "failed", 0.0)]  # a refused delivery counts zero seconds


def test_the_claimer_sleeps_when_idle_and_a_new_run_wakes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """While runs come, the claimer looks every CLAIM_DELAY without being woken; idle, it waits, and the
    next run must wake it: a long run's claim is written all the same (else it stays unrecorded)."""
    monkeypatch.setattr(rekku_workers.claim._Claimer, "IDLE_LOOKS", 3)
    claimer = rekku_workers.claim._Claimer()
    wait_until(lambda: claimer._sleeping, timeout=5, what="the idle claimer to wait")

    class Claim:
        written = threading.Event()
        settled = False
        due = 0.0
        action_id = "a"

        def write(self) -> None:
            self.written.set()

    claim = Claim()
    claimer.add(claim)  # type: ignore[arg-type]
    assert claim.written.wait(5), "a run added while the claimer slept was never claimed"
    wait_until(lambda: claimer._sleeping, timeout=5, what="the claimer to sleep again")
