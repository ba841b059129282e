"""What a running handler can know about its action: who asked, from which chat, and how to report progress.

The seed's handler signature is ``handle_custom_action(action_type, payload)``, so the context
travels in a context variable instead of an argument; handlers call :func:`current_action`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Keys a request context may carry (docs/contracts.md §2).
CONTEXT_KEYS = ("interface", "chat_id", "thread_id", "user_id", "username", "message_id")


class ProgressSink(Protocol):
    """Where a handler's progress goes: set by the worker's progress hook (rekku_workers.hooks.ProgressHook)."""

    def __call__(self, progress: dict) -> None: ...


class AttemptSource(Protocol):
    """Which delivery of the action is running (1 = first): set by the action log's hook
    (rekku_workers.claim.ActionLogHook), which must write its deferred claim before it can tell."""

    def __call__(self) -> int: ...


@dataclass
class ActionContext:
    """The action being run, as its handler sees it.

    ``progress_sink`` and ``attempt_source`` are how the worker's hooks serve :meth:`report_progress`
    and :attr:`attempt`; a context made outside a worker has neither (progress goes nowhere, the
    attempt is 1)."""

    action_id: str
    action_type: str
    batch_id: str | None = None
    interface: str | None = None
    chat_id: str | None = None
    thread_id: str | None = None
    user_id: str | None = None
    username: str | None = None
    message_id: str | None = None
    worker: str | None = None
    progress_sink: ProgressSink | None = field(default=None, repr=False, compare=False)
    attempt_source: AttemptSource | None = field(default=None, repr=False, compare=False)
    _attempt: int | None = field(default=None, repr=False)  # the attempt, once asked (it costs a write)

    @property
    def attempt(self) -> int:
        """Which delivery of this action is running (1 = first), read from the log when first asked."""
        if self._attempt is None:
            self._attempt = self.attempt_source() if self.attempt_source else 1
        return self._attempt

    @classmethod
    def from_request(cls, action_id: str, action_type: str, context: dict | None, **extra: Any) -> ActionContext:
        context = context or {}
        return cls(action_id=action_id, action_type=action_type,
                   **{k: context.get(k) for k in CONTEXT_KEYS}, **extra)

    def report_progress(self, step: str, **info: Any) -> None:
        """Record a named step (shown in Flower, ``GET /v1/actions/{id}`` and ``rekku submit --wait``)."""
        if self.progress_sink is not None:
            self.progress_sink({"step": step, **info})


_current: contextvars.ContextVar[ActionContext | None] = contextvars.ContextVar("rekku_action", default=None)


def current_action() -> ActionContext | None:
    """The action the calling handler is running, or None outside a handler."""
    return _current.get()


def bind(ctx: ActionContext | None) -> contextvars.Token:
    return _current.set(ctx)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)


def normalize_context(context: dict | None) -> dict:
    """Keep the known keys, as strings (chat ids arrive as numbers from some platforms)."""
    out: dict[str, str] = {}
    for key in CONTEXT_KEYS:
        value = (context or {}).get(key)
        if value is not None and value != "":
            out[key] = str(value)
    return out
