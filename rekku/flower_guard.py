"""Flower read-only: without ``REKKU_FLOWER_CONTROL``, the routes that change something are gone.

Flower 2.x has no read-only switch, and its API can shut workers down, resize pools, revoke tasks
and *send any task with any arguments* — ``rekku.action.terminal`` with a trainer's context
included — to whoever holds the Flower credentials. Watching tasks is what Flower is for here; so
``rekku flower`` serves every page and read API but drops those routes from Flower's route table
before the app is built (they answer 404). If this Flower no longer has the routes we expect to
drop, it refuses to start rather than run with control open.

Flower's basic auth covers only the handlers whose methods it decorated with
``tornado.web.authenticated``; ``/metrics`` (task types, worker host names, counts) and
``/healthcheck`` are left open to anyone who can reach the port. :func:`require_auth_everywhere`
puts every route that is not the login page, the static files or the 404 page behind the same
credentials.
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


#: Routes Flower 2.x serves without credentials; require_auth_everywhere must find them.
OPEN_ROUTES = ("/metrics", "/healthcheck")
_METHODS = ("get", "head", "post", "put", "patch", "delete")


def _handler_class(handler: Any) -> Any:
    return handler.handler_class if hasattr(handler, "handler_class") else handler[1]


def _with_auth(cls: type) -> type:
    """A subclass of ``cls`` whose request methods all require the credentials."""
    import tornado.web

    wrapped = {name: tornado.web.authenticated(getattr(cls, name)) for name in _METHODS
               if getattr(cls, name) is not getattr(tornado.web.RequestHandler, name)}
    return type(cls.__name__, (cls,), {**wrapped, "__module__": __name__, "_rekku_auth": True})


def require_auth_everywhere() -> list[str]:
    """Put every Flower route but the login, logout, 404 and static ones behind its auth (before Flower
    builds its app): all of them, not only those whose methods lack the decorator (a second check on
    an authenticated one costs nothing). Returns the patterns of the routes that were open."""
    from flower import urls
    from flower.views import BaseHandler
    from flower.views.auth import LoginHandler, LogoutHandler
    from flower.views.error import NotFoundErrorHandler

    exempt = (LoginHandler, LogoutHandler, NotFoundErrorHandler)
    changed = []
    for i, handler in enumerate(urls.handlers):
        cls = _handler_class(handler)
        if not (isinstance(cls, type) and issubclass(cls, BaseHandler)) or issubclass(cls, exempt):
            continue
        if getattr(cls, "_rekku_auth", False):
            continue
        if any(getattr(cls, name) is not getattr(BaseHandler, name) and not hasattr(getattr(cls, name), "__wrapped__")
               for name in _METHODS):  # a method tornado.web.authenticated did not wrap
            changed.append(_pattern(handler))
        secured = _with_auth(cls)
        if hasattr(handler, "handler_class"):
            handler.handler_class = secured
        else:
            urls.handlers[i] = (handler[0], secured, *handler[2:])
    still_open = [route for route in OPEN_ROUTES if not any(
        _pattern(h).rstrip("$") == route and getattr(_handler_class(h), "_rekku_auth", False) for h in urls.handlers)]
    if still_open:
        raise FlowerGuardError(f"this Flower has no routes {still_open} where rekku expects them: it changed, and "
                               "rekku cannot tell whether they need credentials; pin flower 2.x")
    return changed
