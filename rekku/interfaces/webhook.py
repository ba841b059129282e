"""The webhook interface: each message part is POSTed as signed JSON to ``REKKU_WEBHOOK_URL``.

How other services receive what Rekku says. Headers: ``X-Rekku-Timestamp`` (Unix seconds),
``X-Rekku-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with REKKU_WEBHOOK_SECRET>``
and ``X-Rekku-Delivery`` (unique per action and part: a receiver de-duplicates on it). A 2xx answer
is a delivery; 408, 429 and 5xx are retried; other answers fail the action.

``audio_url`` is a link, never a file's bytes or a server path: an http(s) URL as the payload gave
it, or an artifact's ``/v1/artifacts/{name}`` path on the ingress (``Interface.audio_link``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import requests

from rekku.errors import DeliveryError, PluginError
from rekku.interfaces import _http
from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.registry import register_interface
from rekku.settings import Settings


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Rekku-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@register_interface
class Webhook(Interface):
    name = "webhook"
    max_text = 100_000
    audio = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._local = threading.local()

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        if not settings.webhook_url:
            return "REKKU_WEBHOOK_URL is not set"
        if not settings.webhook_secret:
            return "REKKU_WEBHOOK_SECRET is not set (webhook messages are always signed)"
        return None

    def send(self, message: Outgoing) -> dict[str, Any]:
        audio_url = self.audio_link(message.audio)
        body = json.dumps({
            "id": f"{message.action_id}:{message.key}", "action_id": message.action_id,
            "chat_id": message.chat_id, "thread_id": message.thread_id, "reply_to_message_id": message.reply_to,
            "text": message.text, "audio_url": audio_url, "part": message.part, "parts": message.parts,
        }, ensure_ascii=False).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Rekku-Timestamp": timestamp,
                   "X-Rekku-Signature": signature(self.settings.webhook_secret or "", timestamp, body),
                   "X-Rekku-Delivery": f"{message.action_id}:{message.key}"}
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        resp = _http.post(self._local.session, self.settings.webhook_url or "", self.settings.interface_timeout,
                          "webhook", data=body, headers=headers)
        if resp.ok:
            try:
                answer = resp.json()
            except ValueError:
                answer = {}
            return {"message_id": answer.get("id") if isinstance(answer, dict) else None}
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            retry_after = resp.headers.get("Retry-After")
            raise DeliveryError(f"webhook answered {resp.status_code}",
                                retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None)
        raise PluginError(f"webhook refused the message: {resp.status_code} {resp.text[:200]}")
