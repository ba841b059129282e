"""A fake Discord channel webhook: ``POST /api/webhooks/<id>/<token>?wait=true[&thread_id=]``."""

from __future__ import annotations

import itertools
from typing import Any

from tests.fakes.server import FakeServer, Recorded

#: Discord's limit on a message's content.
MAX_CONTENT = 2000


class FakeDiscord(FakeServer):
    def __init__(self, webhook_id: str = "1", token: str = "hook-token") -> None:
        super().__init__()
        self.path = f"/api/webhooks/{webhook_id}/{token}"
        self.webhook_url = self.url + self.path
        self.ids = itertools.count(5000)
        self.rate_limited = 0

    def reset(self) -> None:
        super().reset()
        self.rate_limited = 0

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        if request.path != self.path:
            return 401, {"message": "Invalid Webhook Token", "code": 50027}, None
        if self.rate_limited > 0:
            self.rate_limited -= 1
            return 429, {"message": "You are being rate limited.", "retry_after": 0.5, "global": False}, None
        content = request.data.get("content") or ""
        if not content or len(content) > MAX_CONTENT:
            return 400, {"message": "Invalid Form Body", "code": 50035}, None
        message = {"id": str(next(self.ids)), "content": content, "channel_id": request.query.get("thread_id", "c1")}
        return (200, message, None) if request.query.get("wait") == "true" else (204, {}, None)
