"""`rekku receive`: Telegram's messages in, by long polling the Bot API's ``getUpdates``.

Each update goes through :func:`rekku.telegram_updates.receive_update` (the webhook's path too), and
only after its message is stored is the next ``offset`` (its update_id + 1) saved in
``receiver_offsets``; the next getUpdates sends that offset, which is what confirms the update to
Telegram. So a crash between storing a message and saving the offset makes the update come again,
and :func:`rekku.messages.receive` finds it stored (same chat and message id): every update is stored
exactly once, and none is lost.

Network errors and 5xx answers are retried with a pause that doubles from 1 s up to
``REKKU_RECEIVE_MAX_BACKOFF``; a 429 waits its ``retry_after``. SIGTERM or Ctrl-C stops it between two
updates, or at once while it waits on Telegram (nothing fetched and not yet stored is confirmed, so
nothing is lost). The bot token is in the URL's path, so no line here logs the URL, and every record
is redacted anyway (rekku/logs.py).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import requests

from rekku.backoff import retry_delay
from rekku.ingest import Ingress, default_ingress
from rekku.settings import Settings
from rekku.telegram_updates import load_offset, receive_update, save_offset

log = logging.getLogger(__name__)

#: Only messages: what Rekku stores (edits, reactions, joins ... are not asked for).
ALLOWED_UPDATES = '["message"]'
#: Seconds an HTTP call may take beyond the long poll's own timeout before it counts as a network error.
HTTP_GRACE = 15.0
#: The first pause after a failure; the longest pause doubles up to REKKU_RECEIVE_MAX_BACKOFF (jittered).
FIRST_BACKOFF = 1.0


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while the receiver was waiting (on Telegram or in a pause); a
    BaseException, so no ``except Exception`` on the way (urllib3's, ours) takes it for an error."""


class Retry(Exception):
    """This poll failed; try again after ``delay`` seconds (None: the growing backoff)."""

    def __init__(self, message: str, delay: float | None = None, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.delay, self.level = delay, level


class TelegramReceiver:
    def __init__(self, settings: Settings, ingress: Ingress | None = None) -> None:
        if not settings.telegram_bot_token:
            raise ValueError("TELEGRAM_BOT_TOKEN is not set")
        self.settings = settings
        self.api_url = settings.telegram_api_url.rstrip("/")
        self._url = f"{self.api_url}/bot{settings.telegram_bot_token}/getUpdates"  # never logged
        self.ingress = ingress or default_ingress()
        self.http = requests.Session()
        self.stopping = False
        self._interruptible = False
        self._failures = 0

    # ------------------------------------------------------------------ stopping
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("%s: stopping", signal.Signals(signum).name)
        self.stopping = True
        if self._interruptible:  # waiting on Telegram or pausing: nothing half done to protect
            raise Stopped

    def _interruptibly(self, call: Any, *args: Any) -> Any:
        if self.stopping:
            raise Stopped
        self._interruptible = True
        try:
            return call(*args)
        finally:
            self._interruptible = False

    def _pause(self, seconds: float) -> None:
        self._interruptibly(time.sleep, seconds)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        offset = None
        try:
            offset = self._interruptibly(self._saved_offset)
            log.info("receiving Telegram messages with getUpdates from %s (long poll %s s, %s)", self.api_url,
                     self.settings.receive_poll_timeout,
                     f"next update {offset}" if offset is not None else "from the oldest unconfirmed update")
            while not self.stopping:
                try:
                    updates = self._interruptibly(self._poll, offset)
                except Retry as retry:
                    delay = retry.delay if retry.delay is not None else self._next_backoff()
                    log.log(retry.level, "%s; retrying in %g s", retry, delay)
                    self._pause(delay)
                    continue
                self._failures = 0
                offset = self._store(updates, offset)
        except Stopped:
            pass
        finally:
            self.http.close()
        log.info("stopped (next update %s)", offset)
        return 0

    def _saved_offset(self) -> int | None:
        """The saved offset; while the database cannot be read, retried (a receiver that exited would stop
        all of `rekku up`)."""
        while True:
            try:
                return load_offset()
            except Exception as exc:
                delay = self._next_backoff()
                log.error("cannot read the saved offset (%s: %s); retrying in %g s", type(exc).__name__, exc, delay)
                time.sleep(delay)

    def _next_backoff(self) -> float:
        """FIRST_BACKOFF after the first failure in a row, then up to twice as long each time (jittered:
        rekku.backoff), at most REKKU_RECEIVE_MAX_BACKOFF."""
        delay = retry_delay(self._failures, self.settings.receive_max_backoff, factor=FIRST_BACKOFF,
                            minimum=FIRST_BACKOFF)
        self._failures += 1
        return delay

    def _store(self, updates: list[dict[str, Any]], offset: int | None) -> int | None:
        """Store each update's message, then save the offset past it; on a failure, pause and return the
        offset of the update that failed (the next poll fetches it again)."""
        for update in updates:
            if self.stopping:
                break
            update_id = update.get("update_id") if isinstance(update, dict) else None
            if not isinstance(update_id, int) or isinstance(update_id, bool):
                log.warning("Telegram sent an update without an update_id; ignored")
                continue
            if offset is not None and update_id < offset:
                continue  # already stored and confirmed (Telegram should not send it again)
            try:
                receive_update(update, self.ingress)
                save_offset(update_id + 1)
            except Exception as exc:
                delay = self._next_backoff()
                log.error("telegram update %s not stored (%s: %s); retrying in %g s", update_id,
                          type(exc).__name__, exc, delay)
                self._pause(delay)
                return offset
            offset = update_id + 1
        return offset

    def _poll(self, offset: int | None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"timeout": self.settings.receive_poll_timeout, "allowed_updates": ALLOWED_UPDATES}
        if offset is not None:
            params["offset"] = offset
        try:
            resp = self.http.get(self._url, params=params, timeout=self.settings.receive_poll_timeout + HTTP_GRACE)
        except requests.RequestException as exc:  # its text names the URL: only its kind is told
            raise Retry(f"cannot reach Telegram at {self.api_url} ({type(exc).__name__})") from None
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        answer = answer if isinstance(answer, dict) else {}
        description = str(answer.get("description") or resp.reason or "")[:300]
        if resp.status_code == 200 and answer.get("ok") is True and isinstance(answer.get("result"), list):
            return answer["result"]
        if resp.status_code == 429:
            parameters = answer.get("parameters") if isinstance(answer.get("parameters"), dict) else {}
            after = parameters.get("retry_after")
            delay = float(after) if isinstance(after, int | float) and after >= 0 else None
            raise Retry(f"Telegram asks to slow down (429 {description})", delay)
        if resp.status_code >= 500:
            raise Retry(f"Telegram answered {resp.status_code} {description}")
        if resp.status_code in (401, 404):
            raise Retry(f"Telegram refused the bot token ({resp.status_code} {description}): check "
                        "TELEGRAM_BOT_TOKEN", level=logging.ERROR)
        if resp.status_code == 409:
            raise Retry(f"Telegram refused getUpdates ({description}): a bot receives either with getUpdates "
                        "(`rekku receive`) or through a webhook (POST /v1/telegram/webhook), never both, and "
                        "only one `rekku receive` per bot token", level=logging.ERROR)
        raise Retry(f"Telegram answered getUpdates with {resp.status_code} {description}", level=logging.ERROR)


def run_receiver(settings: Settings) -> int:
    return TelegramReceiver(settings).run()
