"""Logging for every Rekku process: plain text by default, one JSON object per line with
``REKKU_LOG_FORMAT=json``; either way each line logged while an action runs carries its action id
and batch id, so one action's story can be pulled out of several workers' logs."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from rekku.context import current_action
from rekku.settings import Settings, get_settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(action_tag)s: %(message)s"


class ActionFilter(logging.Filter):
    """Adds ``action_id``, ``batch_id`` and ``action_tag`` (``[action=…]`` or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        action = current_action()
        record.action_id = action.action_id if action else None
        record.batch_id = action.batch_id if action else None
        record.action_tag = f" [action={action.action_id}]" if action else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "action_id": getattr(record, "action_id", None), "batch_id": getattr(record, "batch_id", None),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(settings: Settings | None = None) -> logging.Formatter:
    settings = settings or get_settings()
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def install(handlers: list[logging.Handler], settings: Settings | None = None) -> None:
    """Give ``handlers`` our formatter and the action filter."""
    fmt = formatter(settings)
    for handler in handlers:
        handler.setFormatter(fmt)
        if not any(isinstance(f, ActionFilter) for f in handler.filters):
            handler.addFilter(ActionFilter())


def setup(settings: Settings | None = None) -> None:
    """Logging of a process that is not a Celery worker (ingress, CLI)."""
    settings = settings or get_settings()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(settings.log_level.upper())
    install(root.handlers, settings)
