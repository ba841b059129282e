"""Logging for every Rekku process: plain text by default, one JSON object per line with
``REKKU_LOG_FORMAT=json``; either way each line logged while an action runs carries its action id
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

import json
import logging
import re
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, urlsplit

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
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)


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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "action_id": getattr(record, "action_id", None), "batch_id": getattr(record, "batch_id", None),
            "process": record.process,
        }
        if record.exc_info:  # exc_text when set: the redacted text (see Redactor.scrub)
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(settings: Settings | None = None) -> logging.Formatter:
    settings = settings or get_settings()
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


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
