"""A fake receiver of the model webhook (the feed pushed, item by item): records every POST and answers
200, or what the test tells it to answer."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from tests.fakes.server import FakeServer, Recorded


class FakeModelReceiver(FakeServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        #: The next answers, oldest first (each a status code), before it goes back to 200.
        self.script: list[int] = []
        #: Feed ids answered with this status every time (a receiver that cannot take that item).
        self.refuse: dict[int, int] = {}

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        item = int(request.headers.get("x-rekku-feed-id", 0))
        with self.lock:
            status = self.script.pop(0) if self.script else self.refuse.get(item, 200)
        if status == 200:
            return 200, {"ok": True}, None
        return status, {"error": f"answering {status}"}, {"Retry-After": "1"} if status in (429, 503) else None

    def pushes(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == "POST"]

    def ids(self) -> list[int]:
        """The feed id of every POST, in arrival order (repeats included)."""
        return [int(r.headers["x-rekku-feed-id"]) for r in self.pushes()]

    def acknowledged(self) -> list[int]:
        """The feed ids it answered 2xx, in order."""
        with self.lock:
            return [int(r.headers["x-rekku-feed-id"]) for r in self.requests
                    if r.method == "POST" and isinstance(r.response, dict) and r.response.get("ok")]


def verify(secret: str, request: Recorded) -> dict:
    """What a receiver does: check X-Rekku-Signature (``sha256=`` HMAC-SHA256 of "<timestamp>.<raw body>")
    and return the item; AssertionError when the signature is wrong."""
    timestamp = request.headers["x-rekku-timestamp"]
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + request.raw, hashlib.sha256).hexdigest()
    expected = "sha256=" + digest
    assert hmac.compare_digest(expected, request.headers["x-rekku-signature"]), "bad signature"
    return json.loads(request.raw)
