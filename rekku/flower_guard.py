"""Flower read-only: without ``REKKU_FLOWER_CONTROL``, the routes that change something are gone.

Flower 2.x has no read-only switch, and its API can shut workers down, resize pools, revoke tasks
and *send any task with any arguments* — ``rekku.action.terminal`` with a trainer's context
included — to whoever holds the Flower credentials. Watching tasks is what Flower is for here; so
``rekku flower`` serves every page and read API but drops those routes from Flower's route table
before the app is built (they answer 404). If this Flower no longer has the routes we expect to
drop, it refuses to start rather than run with control open.
"""

from __future__ import annotations

from typing import Any

#: Route prefixes of Flower's API that act on workers or tasks.
CONTROL_ROUTES = ("/api/worker/shutdown/", "/api/worker/pool/", "/api/worker/queue/", "/api/task/apply/",
                  "/api/task/async-apply/", "/api/task/send-task/", "/api/task/abort/", "/api/task/timeout/",
                  "/api/task/rate-limit/", "/api/task/revoke/")


class FlowerGuardError(RuntimeError):
    """This Flower's routes are not the ones the guard knows: it would not be read-only."""


def _pattern(handler: Any) -> str:
    return handler.regex.pattern if hasattr(handler, "regex") else handler[0]


def make_read_only() -> list[str]:
    """Remove Flower's control routes (before Flower builds its app); returns the patterns removed."""
    from flower import urls

    removed = [_pattern(h) for h in urls.handlers if _pattern(h).startswith(CONTROL_ROUTES)]
    missing = [prefix for prefix in CONTROL_ROUTES if not any(p.startswith(prefix) for p in removed)]
    if missing:
        raise FlowerGuardError(f"this Flower has no routes {missing}: it changed, and rekku cannot make it "
                               "read-only; set REKKU_FLOWER_CONTROL=true to run it with control, or pin flower 2.x")
    urls.handlers[:] = [h for h in urls.handlers if not _pattern(h).startswith(CONTROL_ROUTES)]
    return removed
