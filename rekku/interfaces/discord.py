"""Discord through a channel webhook (``DISCORD_WEBHOOK_URL``): ``POST <webhook>?wait=true``.

Texts are split at Discord's 2,000 characters; a ``thread_id`` posts into that thread of the
webhook's channel; a 429's ``retry_after`` becomes the retry's delay.

It takes no files (no ``audio_discord_bot``); an audio forwarded to a linked Discord chat is refused
with the reason, and no file is ever read or attached.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlencode

import requests

from rekku.errors import DeliveryError, PluginError
from rekku.interfaces import _http
from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.registry import register_interface
from rekku.settings import Settings


@register_interface
class DiscordBot(Interface):
    name = "discord_bot"
    max_text = 2000

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._local = threading.local()

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        return None if settings.discord_webhook_url else "DISCORD_WEBHOOK_URL is not set"

    def send(self, message: Outgoing) -> dict[str, Any]:
        if message.audio is not None:
            raise PluginError("discord_bot takes no audio or files; send a text message with the link instead")
        query = {"wait": "true", **({"thread_id": message.thread_id} if message.thread_id else {})}
        url = f"{self.settings.discord_webhook_url}{'&' if '?' in (self.settings.discord_webhook_url or '') else '?'}"
        body: dict[str, Any] = {"content": message.text, "allowed_mentions": {"parse": []}}
        if message.reply_to:
            body["message_reference"] = {"message_id": message.reply_to, "fail_if_not_exists": False}
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        resp = _http.post(self._local.session, url + urlencode(query), self.settings.interface_timeout,
                          "Discord webhook", json=body)
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        if resp.ok:
            return {"message_id": answer.get("id") if isinstance(answer, dict) else None}
        if resp.status_code == 429:
            raise DeliveryError("Discord: rate limited", retry_after=float(answer.get("retry_after", 1)))
        if resp.status_code >= 500:
            raise DeliveryError(f"Discord answered {resp.status_code}")
        raise PluginError(f"Discord refused the message: {resp.status_code} {answer.get('message', resp.text[:200])}")
