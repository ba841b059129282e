"""A fake Telegram Bot API: ``/bot<token>/<method>`` for sendMessage, sendVoice, sendAudio and getChat.

It checks the token, answers like the real API (``{"ok": true, "result": ...}``), and on demand:
429 with ``parameters.retry_after``, "message thread not found" for given thread ids, or a request
held open until released (to kill a worker in the middle of a send).
"""

from __future__ import annotations

import itertools
import threading
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

    def reset(self) -> None:
        super().reset()
        self.rate_limited, self.missing_threads, self.hold_text = 0, set(), None
        self.held.clear()
        self.release.clear()

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
        if method == "getChat":
            chat = self.chats.get(str(data.get("chat_id")))
            if chat is None:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}, None
            return 200, {"ok": True, "result": chat}, None
        return 404, {"ok": False, "error_code": 404, "description": "Not Found"}, None

    def _message(self, data: dict, **extra: Any) -> dict:
        return {"message_id": next(self.ids), "chat": {"id": data.get("chat_id")}, "date": 0, **extra}
