"""Logging for every Rekku process: plain text by default, one JSON object per line with
``REKKU_LOG_FORMAT=json`` (python-json-logger: ``extra=`` fields are keys; uvicorn's own lines come
through :func:`uvicorn_log_config`, Celery's through its logging signals and
:func:`celery_prints_as_records`); either way each line logged while an action runs carries its action id
and batch id, so one action's story can be pulled out of several workers' logs.

Configured secrets never reach a log line: :func:`redact_secrets` replaces every value Rekku knows
to be secret (the Telegram and Discord bot tokens, the Discord webhooks' paths, the API token, the
webhook secrets (ours and Telegram's), the model webhook's secret, the model endpoint's API key, the
broker's and the database's passwords, Flower's password; and each plugin's ``SecretStr`` settings,
such as Reddit's and ElevenLabs' passwords, from when the plugin's settings are read:
rekku/plugin_settings.py) with ``***`` in every record this process makes, whoever logs it: at DEBUG,
urllib3 logs each request line (``"POST /bot<token>/sendMessage HTTP/1.1" 200``), which carries the
bot token in its path."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

from pythonjsonlogger import core as jsonlogger_core
from pythonjsonlogger import json as jsonlogger

from rekku.context import current_action
from rekku.settings import Settings, get_settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(action_tag)s: %(message)s"
#: What a secret is shown as.
HIDDEN = "***"
#: Shorter values are not treated as secrets (redacting "pw" would mangle every line, and hide nothing).
MIN_SECRET_CHARS = 4


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def _webhook_secrets(url: str) -> list[str]:
    """A webhook URL's path and its last part (the token)."""
    try:
        path = urlsplit(url).path.rstrip("/")
    except ValueError:
        return [url]
    return [path, path.rpartition("/")[2]] if path else []


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def configured_secrets(settings: Settings) -> set[str]:
    """Every secret value the settings name, or that REKKU_HOME holds (generated API token, Flower
    credentials, the embedded broker's password); read without creating anything."""
    values: list[str | None] = [
        settings.telegram_bot_token, settings.discord_bot_token, settings.api_token, settings.webhook_secret,
        settings.telegram_webhook_secret, settings.db_pass, settings.model_webhook_secret, settings.llm_api_key,
        settings.sentinel_password,
        _url_password(settings.database_url), _url_password(settings.broker_url),
        _url_password(settings.model_webhook_url)]
    # Discord webhooks (.../api/webhooks/<id>/<token>: the path is the credential), read as loosely as
    # DISCORD_WEBHOOK_URLS may be written: a malformed entry is still a secret
    entries = settings.discord_webhook_urls.replace("\n", ",").split(",")
    for url in [settings.discord_webhook_url or "", *(e.partition("=")[2] or e for e in entries)]:
        values += _webhook_secrets(url.strip())
    home = settings.home.expanduser()
    values += [_read(home / "api_token"), _url_password(_read(home / "embedded-redis.url"))]
    for auth in (settings.flower_basic_auth, _read(home / "flower_auth")):
        if auth:
            values += [auth, *(part.partition(":")[2] for part in auth.split(","))]
    return {v for v in values if v and len(v) >= MIN_SECRET_CHARS}


class Redactor:
    """Replaces known secret values (and their URL-quoted forms) in log records."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            forms = {form for v in values for form in (v, quote(v), quote(v, safe=""), quote_plus(v))
                     if len(form) >= MIN_SECRET_CHARS}
            if forms <= self.secrets:
                return
            self.secrets |= forms
            alternatives = sorted(self.secrets, key=len, reverse=True)  # longest first: no partial leftovers
            self.pattern = re.compile("|".join(map(re.escape, alternatives)))

    def text(self, text: str) -> str:
        pattern = self.pattern
        return pattern.sub(HIDDEN, text) if pattern is not None and text else text

    def scrub(self, record: logging.LogRecord) -> None:
        """Redact ``record`` in place, once (the record factory and the handler filter both ask): its
        message (formatted once, if it held a secret), its exception text and its stack."""
        if self.pattern is None or getattr(record, "_rekku_redacted", False):
            return
        record._rekku_redacted = True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it when it formats the record
            return
        clean = self.text(message)
        if clean != message:
            record.msg, record.args = self._clean_args(record, clean) or (clean, ())
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)

    def _clean_args(self, record: logging.LogRecord, clean: str) -> tuple[object, tuple] | None:
        """The record's format with each argument redacted, when that gives ``clean``: its arguments stay
        apart (uvicorn's access lines keep their method, path and status as JSON keys)."""
        if not isinstance(record.args, tuple) or not record.args or not isinstance(record.msg, str):
            return None
        args = tuple(self.text(a) if isinstance(a, str) else a for a in record.args)
        try:
            return (record.msg, args) if record.msg % args == clean else None
        except (TypeError, ValueError):
            return None


_PLAIN = logging.Formatter()
#: This process's redactor: every record made here passes through it (see :func:`redact_secrets`).
REDACTOR = Redactor()
_factory_lock = threading.Lock()
_factory_installed = False


def redact_secrets(settings: Settings | None = None) -> None:
    """From now on, every log record this process makes (and its forked children make) has the
    configured secrets replaced by ``***``: a log record factory, so records of every logger and
    handler are covered (urllib3's, Celery's, uvicorn's, tornado's). Called again, it adds secrets
    that appeared since (a token generated at start)."""
    global _factory_installed
    REDACTOR.add(configured_secrets(settings or get_settings()))
    with _factory_lock:
        if _factory_installed:
            return
        make = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = make(*args, **kwargs)
            REDACTOR.scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


class RedactFilter(logging.Filter):
    """The same redaction on a handler, for records made without the factory (``makeLogRecord``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        REDACTOR.scrub(record)
        return True


class ActionFilter(logging.Filter):
    """Adds ``action_id``, ``batch_id`` and ``action_tag`` (``[action=…]`` or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        action = current_action()
        record.action_id = action.action_id if action else None
        record.batch_id = action.batch_id if action else None
        record.action_tag = f" [action={action.action_id}]" if action else ""
        return True


#: Attributes Rekku's own filters put on records that are not shown as keys of their own (the text
#: format's tag; the redactor's mark) besides the standard ones.
_NOT_KEYS = ("action_tag", "_rekku_redacted", "color_message")
#: The keys every JSON line starts with (renamed from the record's attributes).
_JSON_KEYS = {"asctime": "ts", "levelname": "level", "name": "logger", "message": "message",
              "action_id": "action_id", "batch_id": "batch_id", "process": "process"}
#: What uvicorn's access lines (``%s - "%s %s HTTP/%s" %d``) hold, as keys of their own.
_ACCESS_KEYS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(jsonlogger.JsonFormatter):
    """One JSON object per line (python-json-logger): ``ts``, ``level``, ``logger``, ``message``,
    ``action_id``, ``batch_id``, ``process``, then every ``extra=`` field as a key of its own, an
    ``exception`` when there is one, and uvicorn's access lines' parts as keys. The whole line is
    redacted once more: an ``extra=`` value is not part of the message the record factory cleaned."""

    def __init__(self) -> None:
        super().__init__(list(_JSON_KEYS), rename_fields={**_JSON_KEYS, "exc_info": "exception"},
                         reserved_attrs=[*jsonlogger_core.RESERVED_ATTRS, *_NOT_KEYS], json_default=str,
                         json_ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat()

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        if record.exc_text and record.exc_info:  # Redactor.scrub's redacted text, not a fresh traceback
            message_dict = {**message_dict, "exc_info": record.exc_text}
        super().add_fields(log_data, record, message_dict)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            log_data.update(zip(_ACCESS_KEYS, record.args, strict=True))

    def format(self, record: logging.LogRecord) -> str:
        return REDACTOR.text(super().format(record))


def formatter(settings: Settings | None = None) -> logging.Formatter:
    settings = settings or get_settings()
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def celery_prints_as_records() -> None:
    """JSON mode of a Celery process: Python's warnings (Celery's superuser warning) and the few lines
    Celery's worker prints itself instead of logging (its shutdown notices, through
    ``celery.apps.worker.safe_say``) become log records, so they are JSON lines too. (Its banner is
    left out with ``--quiet``.)"""
    from celery.apps import worker as celery_worker

    logging.captureWarnings(True)
    printed = logging.getLogger("celery.apps.worker")
    celery_worker.safe_say = lambda msg, f=None: printed.warning("%s", str(msg).strip())


def stream_handler() -> logging.Handler:
    """A stderr handler with Rekku's format, action ids and redaction: what :func:`uvicorn_log_config`
    names, built in each uvicorn process (``--workers N`` starts fresh interpreters)."""
    handler = logging.StreamHandler()
    install([handler])
    return handler


def uvicorn_log_config(settings: Settings | None = None) -> dict[str, Any]:
    """uvicorn's ``log_config``: its own loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``) go
    to the root logger's one handler, so their lines have Rekku's format (JSON lines with
    ``REKKU_LOG_FORMAT=json``) and redaction like every other line, in each of its processes."""
    settings = settings or get_settings()
    return {
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"rekku": {"()": "rekku.logs.stream_handler"}},
        "root": {"handlers": ["rekku"], "level": settings.log_level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def install(handlers: list[logging.Handler], settings: Settings | None = None) -> None:
    """Give ``handlers`` our formatter, the action filter and the secret redaction."""
    settings = settings or get_settings()
    redact_secrets(settings)
    fmt = formatter(settings)
    for handler in handlers:
        handler.setFormatter(fmt)
        if not any(isinstance(f, ActionFilter) for f in handler.filters):
            handler.addFilter(ActionFilter())
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def setup(settings: Settings | None = None) -> None:
    """Logging of a process that is not a Celery worker (ingress, CLI)."""
    settings = settings or get_settings()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(settings.log_level.upper())
    install(root.handlers, settings)
