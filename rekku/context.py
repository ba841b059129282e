"""What a running handler can know about its action: who asked, from which chat, and how to report progress.

The seed's handler signature is ``handle_custom_action(action_type, payload)``, so the context
travels in a context variable instead of an argument; handlers call :func:`current_action`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Keys a request context may carry (docs/contracts.md §2).
CONTEXT_KEYS = ("interface", "chat_id", "thread_id", "user_id", "username", "message_id")


@dataclass
class ActionContext:
    """The action being run, as its handler sees it."""

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
    _progress_sink: Callable[[dict], None] | None = field(default=None, repr=False)
    _attempt: int | None = field(default=None, repr=False)
    _attempt_loader: Callable[[], int] | None = field(default=None, repr=False)

    @property
    def attempt(self) -> int:
        """Which delivery of this action is running (1 = first), read from the log when first asked."""
        if self._attempt is None:
            self._attempt = self._attempt_loader() if self._attempt_loader else 1
        return self._attempt

    @classmethod
    def from_request(cls, action_id: str, action_type: str, context: dict | None, **extra: Any) -> ActionContext:
        context = context or {}
        return cls(action_id=action_id, action_type=action_type,
                   **{k: context.get(k) for k in CONTEXT_KEYS}, **extra)

    def report_progress(self, step: str, **info: Any) -> None:
        """Record a named step (shown in Flower, ``GET /v1/actions/{id}`` and ``rekku submit --wait``)."""
        if self._progress_sink is not None:
            self._progress_sink({"step": step, **info})


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
