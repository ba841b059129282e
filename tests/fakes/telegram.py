"""A fake Telegram Bot API: ``/bot<token>/<method>`` for sendMessage, sendVoice, sendAudio, getChat and
getUpdates.

It checks the token, answers like the real API (``{"ok": true, "result": ...}``), and on demand:
429 with ``parameters.retry_after``, "message thread not found" for given thread ids, or a request
held open until released (to kill a worker in the middle of a send).

getUpdates serves a queue of updates the test adds (:meth:`FakeTelegram.add_update`,
:meth:`FakeTelegram.add_message`) as the real API does: ``offset`` confirms (drops for good) every
update before it, ``timeout`` holds the request until an update arrives or the time passes (a long
poll), ``limit`` caps the answer; :meth:`FakeTelegram.fail_updates` answers the next calls with 429
or a 5xx instead.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

from tests.fakes.server import FakeServer, Recorded

#: The real API's limit on one message's text.
MAX_TEXT = 4096


class FakeTelegram(FakeServer):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.ids = itertools.count(1000)
        self.rate_limited = 0
        self.retry_after = 1
        self.missing_threads: set[str] = set()
        self.chats: dict[str, dict] = {}
        self.hold_text: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        # getUpdates: the updates not yet confirmed, and the failures to answer first
        self.update_ids = itertools.count(500_000)
        self.message_ids = itertools.count(1)
        self.updates: list[dict] = []
        self.new_update = threading.Condition(self.lock)
        self.update_failures: list[tuple[int, dict]] = []

    def reset(self) -> None:
        super().reset()
        self.rate_limited, self.missing_threads, self.hold_text = 0, set(), None
        self.held.clear()
        self.release.clear()
        with self.lock:
            self.updates, self.update_failures = [], []

    # ------------------------------------------------------------------ getUpdates
    def add_update(self, **fields: Any) -> dict:
        """Queue an update (``message=...``, ``edited_message=...`` ...) with the next update_id; a
        held long poll answers at once."""
        with self.lock:
            update = {"update_id": next(self.update_ids), **fields}
            self.updates.append(update)
            self.new_update.notify_all()
        return update

    def add_message(self, chat_id: int | str, text: str | None = None, *, user_id: int = 77, username: str | None
                    = "ann", first_name: str = "Ann", chat_type: str = "private", title: str | None = None,
                    **fields: Any) -> dict:
        """Queue an update holding a user's message to the bot (``text`` unless None; ``fields`` adds
        or replaces message fields: caption, sticker, message_thread_id, reply_to_message ...)."""
        sender = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            sender["username"] = username
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if title:
            chat["title"] = title
        elif chat_type == "private":
            chat["first_name"] = first_name
        message: dict[str, Any] = {"message_id": next(self.message_ids), "from": sender, "chat": chat,
                                   "date": int(time.time())}
        if text is not None:
            message["text"] = text
        return self.add_update(message={**message, **fields})

    def fail_updates(self, status: int = 429, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` getUpdates calls with ``status`` (429 with ``retry_after``, or a 5xx)."""
        body = {"ok": False, "error_code": status, "description": "Internal Server Error"}
        if status == 429:
            body.update(description=f"Too Many Requests: retry after {retry_after}",
                        parameters={"retry_after": retry_after})
        with self.lock:
            self.update_failures += [(status, body)] * times

    def polls(self) -> list[Recorded]:
        """The getUpdates calls received, oldest first."""
        return self.received("/getUpdates")

    def _get_updates(self, data: dict) -> tuple[int, Any, dict | None]:
        try:
            offset = int(data["offset"]) if data.get("offset") not in (None, "") else None
            timeout = float(data.get("timeout") or 0)
            limit = min(max(int(data.get("limit") or 100), 1), 100)
            allowed = data.get("allowed_updates")
            allowed = json.loads(allowed) if isinstance(allowed, str) else allowed
        except (TypeError, ValueError):
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: wrong parameters"}, None
        deadline = time.monotonic() + timeout
        with self.new_update:
            if self.update_failures:
                status, body = self.update_failures.pop(0)
                return status, body, None
            if offset is not None:  # confirmed: gone for good, as on Telegram
                self.updates = [u for u in self.updates if u["update_id"] >= offset]
            while True:
                ready = [u for u in self.updates if not allowed or any(kind in u for kind in allowed)]
                remaining = deadline - time.monotonic()
                if ready or remaining <= 0:
                    return 200, {"ok": True, "result": ready[:limit]}, None
                self.new_update.wait(remaining)

    def rate_limit(self, times: int, retry_after: int = 1) -> None:
        """Answer the next ``times`` sends with 429 Too Many Requests."""
        self.rate_limited, self.retry_after = times, retry_after

    def hold(self, text_prefix: str) -> None:
        """Keep the request of a sendMessage whose text starts with ``text_prefix`` open until :attr:`release`."""
        self.hold_text = text_prefix

    def sends(self, chat_id: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.path.rsplit("/", 1)[-1].startswith("send")
                and (chat_id is None or str(r.data.get("chat_id")) == str(chat_id))]

    def uploads(self, chat_id: str | None = None) -> list[tuple[str, str, bytes]]:
        """Every file uploaded to a send method (field name, file name, whole content), oldest first."""
        return [upload for r in self.sends(chat_id) for upload in r.uploads]

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        prefix, _, method = request.path.rpartition("/")
        if prefix != f"/bot{self.token}":
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}, None
        data = request.data
        if method.startswith("send"):
            with self.lock:
                limited = self.rate_limited > 0
                self.rate_limited -= 1 if limited else 0
            if limited:
                return 429, {"ok": False, "error_code": 429, "parameters": {"retry_after": self.retry_after},
                             "description": f"Too Many Requests: retry after {self.retry_after}"}, None
            if not data.get("chat_id"):
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: chat_id is empty"}, None
            thread = data.get("message_thread_id")
            if thread is not None and str(thread) in self.missing_threads:
                return 400, {"ok": False, "error_code": 400,
                             "description": "Bad Request: message thread not found"}, None
        if method == "sendMessage":
            text = data.get("text") or ""
            if not text or len(text) > MAX_TEXT:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"}, None
            if self.hold_text and text.startswith(self.hold_text):
                self.held.set()
                self.release.wait(60)
            return 200, {"ok": True, "result": self._message(data, text=text)}, None
        if method in ("sendVoice", "sendAudio"):
            field = "voice" if method == "sendVoice" else "audio"
            if field not in data and field not in request.files:
                return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: there is no {field}"}, None
            return 200, {"ok": True, "result": self._message(data, **{field: {"file_id": "f1"}})}, None
        if method == "getUpdates":
            return self._get_updates(data)
        if method == "getChat":
            chat = self.chats.get(str(data.get("chat_id")))
            if chat is None:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}, None
            return 200, {"ok": True, "result": chat}, None
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}, None

    def _message(self, data: dict, **extra: Any) -> dict:
        return {"message_id": next(self.ids), "chat": {"id": data.get("chat_id")}, "date": 0, **extra}
