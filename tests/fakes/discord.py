"""A fake Discord: channel webhooks and the bot's REST API, as Discord answers them.

* webhooks: ``GET /api/webhooks/<id>/<token>`` (the webhook object, with its ``channel_id``) and
  ``POST /api/webhooks/<id>/<token>?wait=true[&thread_id=]``;
* the bot: ``POST /api/v10/channels/<channel id>/messages`` with ``Authorization: Bot <token>``
  (serve ``url + "/api/v10"`` as DISCORD_API_URL); a channel or thread the bot cannot see is a 404.

Both take JSON, or multipart with ``payload_json`` and files (``files[0]``...). ``posted`` records
every message accepted, per channel (a thread is a channel): its content, files, reply and whether
a bot or a webhook sent it. ``rate_limit(n)`` answers the next n message posts with 429 and
``retry_after``. Content limits are Discord's (2,000 characters; content or a file is needed).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.server import FakeServer, Recorded

#: Discord's limit on a message's content.
MAX_CONTENT = 2000
#: The bot API's path prefix (what DISCORD_API_URL adds to the host).
API = "/api/v10"


@dataclass
class Posted:
    """One message Discord accepted."""

    id: str
    channel: str
    content: str
    #: "bot" or "webhook".
    via: str
    #: (field name, file name, content) of every file.
    files: list[tuple[str, str, bytes]] = field(default_factory=list)
    reply_to: str | None = None
    request: Recorded | None = None


class FakeDiscord(FakeServer):
    def __init__(self, channel: str = "chan", bot_token: str = "fake-discord-bot-token") -> None:
        super().__init__()
        self.bot_token = bot_token
        self.ids = itertools.count(5000)
        #: Webhook path -> the channel it posts to.
        self.webhooks: dict[str, str] = {}
        #: Channels and threads the bot can post in.
        self.channels: set[str] = set()
        self.posted: dict[str, list[Posted]] = {}
        self.rate_limited = 0
        self.retry_after = 0.5
        self.webhook_url = self.add_webhook(channel, webhook_id="1", token="hook-token")
        self.path = self.webhook_url.removeprefix(self.url)

    @property
    def api_url(self) -> str:
        return self.url + API

    def add_webhook(self, channel: str, webhook_id: str | None = None, token: str | None = None) -> str:
        """A new webhook of ``channel``; its URL."""
        webhook_id = webhook_id or str(next(self.ids))
        path = f"/api/webhooks/{webhook_id}/{token or f'token-{webhook_id}'}"
        with self.lock:
            self.webhooks[path] = channel
        return self.url + path

    def add_channel(self, *channels: str) -> None:
        """Channels (or threads) the bot can see."""
        with self.lock:
            self.channels.update(channels)

    def rate_limit(self, times: int, retry_after: float = 0.5) -> None:
        """Answer the next ``times`` message posts with 429 Too Many Requests."""
        self.rate_limited, self.retry_after = times, retry_after

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.rate_limited, self.retry_after = 0, 0.5
            self.posted.clear()

    def messages(self, channel: str) -> list[Posted]:
        with self.lock:
            return list(self.posted.get(channel, []))

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        if request.path in self.webhooks:
            channel = self.webhooks[request.path]
            if request.method == "GET":
                return 200, {"id": request.path.split("/")[3], "type": 1, "channel_id": channel,
                             "name": "Rekku", "token": request.path.rsplit("/", 1)[1]}, None
            return self._post(request, request.query.get("thread_id") or channel, "webhook",
                              wait=request.query.get("wait") == "true")
        if request.path.startswith("/api/webhooks/"):
            return 401, {"message": "Invalid Webhook Token", "code": 50027}, None
        prefix, _, rest = request.path.partition(f"{API}/channels/")
        channel, _, tail = rest.partition("/")
        if prefix or tail != "messages" or request.method != "POST":
            return 404, {"message": "404: Not Found", "code": 0}, None
        if request.headers.get("authorization") != f"Bot {self.bot_token}":
            return 401, {"message": "401: Unauthorized", "code": 0}, None
        if channel not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}, None
        return self._post(request, channel, "bot")

    def _post(self, request: Recorded, channel: str, via: str, wait: bool = True) -> tuple[int, Any, dict | None]:
        with self.lock:
            limited = self.rate_limited > 0
            self.rate_limited -= 1 if limited else 0
        if limited:
            return 429, {"message": "You are being rate limited.", "retry_after": self.retry_after,
                         "global": False}, {"Retry-After": str(max(1, round(self.retry_after)))}
        body = json.loads(request.data["payload_json"]) if "payload_json" in request.data else request.data
        content = body.get("content") or ""
        if (not content and not request.uploads) or len(content) > MAX_CONTENT:
            return 400, {"message": "Invalid Form Body", "code": 50035}, None
        reply = (body.get("message_reference") or {}).get("message_id")
        message = Posted(str(next(self.ids)), channel, content, via, list(request.uploads),
                         str(reply) if reply is not None else None, request)
        with self.lock:
            self.posted.setdefault(channel, []).append(message)
        answer = {"id": message.id, "channel_id": channel, "content": content,
                  "attachments": [{"id": str(next(self.ids)), "filename": name} for _, name, _ in request.uploads]}
        return (200, answer, None) if wait else (204, {}, None)
