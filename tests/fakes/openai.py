"""A fake OpenAI-compatible chat-completions endpoint: ``POST /v1/chat/completions``.

It records each request's ``messages`` per chat (the chat named by the prompt's ``input`` in the
request), answers scripted replies per chat (text, or an HTTP status to fail with), ``{"actions": []}``
when a chat's script is used up, can hold a chat's requests open until released, and counts how many
requests of one chat were open at once.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any

from tests.fakes.server import FakeServer, Recorded

SILENT = '{"actions": []}'
#: A scripted reply that is a 200 without a usable completion (no choices).
MALFORMED = "<malformed completion>"


def chat_of(messages: list[dict]) -> str | None:
    """The chat a request is about: the ``input.payload.source.chat_id`` of the prompt it carries."""
    for message in messages:
        try:
            content = json.loads(message.get("content") or "")
        except (TypeError, ValueError):
            continue
        if isinstance(content, dict) and isinstance(content.get("input"), dict) and "context" in content:
            return content["input"]["payload"]["source"]["chat_id"]
    return None


class FakeOpenAI(FakeServer):
    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.scripts: dict[str, list[str | int]] = defaultdict(list)
        #: Every completions request's messages, per chat, in arrival order.
        self.calls: dict[str, list[list[dict]]] = defaultdict(list)
        self.open: dict[str, int] = defaultdict(int)
        #: The most requests of one chat that were open at the same moment.
        self.most_open: dict[str, int] = defaultdict(int)
        self.hold_chat: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def script(self, chat: str, *replies: str | int | dict) -> None:
        """The next answers for ``chat``: a reply's text (a dict is sent as its JSON) or a status code."""
        with self.lock:
            self.scripts[chat] += [json.dumps(r) if isinstance(r, dict) else r for r in replies]

    def hold(self, chat: str) -> None:
        """Keep ``chat``'s requests open until :attr:`release` is set."""
        self.hold_chat = chat
        self.held.clear()
        self.release.clear()

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        if request.path != "/v1/chat/completions":
            return 404, {"error": {"message": "no such route"}}, None
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "bad key"}}, None
        messages = request.data.get("messages") or []
        chat = chat_of(messages) or "?"
        with self.lock:
            self.calls[chat].append(messages)
            self.open[chat] += 1
            self.most_open[chat] = max(self.most_open[chat], self.open[chat])
        try:
            if chat == self.hold_chat:
                self.held.set()
                self.release.wait(60)
            with self.lock:
                reply = self.scripts[chat].pop(0) if self.scripts[chat] else SILENT
        finally:
            with self.lock:
                self.open[chat] -= 1
        if isinstance(reply, int):
            return reply, {"error": {"message": f"scripted {reply}"}}, None
        if reply == MALFORMED:
            return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "choices": []}, None
        return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": request.data.get("model"),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": reply}}]}, None

    def texts(self, chat: str) -> list[list[str]]:
        """Each call's message contents, per call."""
        with self.lock:
            return [[m.get("content") or "" for m in call] for call in self.calls[chat]]

    def system_messages(self, chat: str, call: int) -> list[dict]:
        """The ``system_message`` objects call ``call`` of ``chat`` carried."""
        found = []
        for text in self.texts(chat)[call]:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("system_message"), dict):
                found.append(value["system_message"])
        return found
