"""Telegram through the Bot API over HTTP (``sendMessage``, ``sendVoice``/``sendAudio``, ``getChat``).

``TELEGRAM_API_URL`` is the API's base URL, so tests run it against a local fake Bot API. A 429
answer's ``retry_after`` becomes the retry's delay; a topic (thread) that no longer exists is
dropped and the message sent to the chat itself, as upstream did.

Audio follows the one file rule (rekku.artifacts.classify_file_ref), checked again here: an
artifact's bytes are uploaded (opened by :func:`rekku.artifacts.open_artifact`, never through a
link), an http(s) URL or a file_id is handed to Telegram as is (Telegram fetches a URL itself).
No other local path is ever opened.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import requests

from rekku.artifacts import ARTIFACT, URL, FileRef, FileRefRefused, open_artifact
from rekku.errors import DeliveryError, PluginError
from rekku.interfaces import _http
from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.registry import register_interface
from rekku.settings import Settings

#: Audio files Telegram shows as voice notes; anything else is sent as a music file.
VOICE_SUFFIXES = (".ogg", ".oga", ".opus")
#: Error descriptions meaning the topic is gone: the message goes to the chat instead.
THREAD_GONE = ("message thread not found", "topic_deleted", "topic closed")


@register_interface
class TelegramBot(Interface):
    name = "telegram_bot"
    max_text = 4000
    audio = True
    file_ids = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.base = f"{settings.telegram_api_url.rstrip('/')}/bot{settings.telegram_bot_token}"
        self._local = threading.local()

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        if not settings.telegram_bot_token:
            return "TELEGRAM_BOT_TOKEN is not set"
        return None

    @property
    def http(self) -> requests.Session:
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def send(self, message: Outgoing) -> dict[str, Any]:
        data: dict[str, Any] = {"chat_id": message.chat_id}
        if message.thread_id:
            data["message_thread_id"] = message.thread_id
        if message.reply_to:
            data["reply_parameters"] = {"message_id": _int(message.reply_to), "allow_sending_without_reply": True}
        if message.audio:
            outcome = self._send_audio(data, message.audio)
        else:
            outcome = self._call("sendMessage", {**data, "text": message.text})
        outcome.pop("result", None)
        return outcome

    def chat_info(self, chat_id: str) -> dict[str, Any]:
        """Title, username and link of a chat (``getChat``)."""
        chat = self._call("getChat", {"chat_id": chat_id})["result"]
        username = chat.get("username")
        return {"chat_name": chat.get("title") or username or chat.get("first_name"),
                "link": f"https://t.me/{username}" if username else None}

    def _send_audio(self, data: dict[str, Any], audio: str) -> dict[str, Any]:
        ref = self.checked_audio(audio)
        method, field = ("sendVoice", "voice") if _suffix(ref).endswith(VOICE_SUFFIXES) else ("sendAudio", "audio")
        if ref.kind != ARTIFACT:
            return self._call(method, {**data, field: ref.value})  # a URL or a file_id: Telegram's to use
        try:
            fh = open_artifact(ref.value, self.settings)
        except FileRefRefused as exc:  # changed since it was checked a moment ago
            raise self.audio_refused(exc) from None
        with fh:
            form = {k: str(v) if not isinstance(v, dict) else _json(v) for k, v in data.items()}
            return self._call(method, form, files={field: (ref.value, fh)})

    def _call(self, method: str, data: dict[str, Any], files: dict | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"data": data, "files": files} if files else {"json": data}
        resp = _http.post(self.http, f"{self.base}/{method}", self.settings.interface_timeout,
                          f"Telegram {method}", **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = {"ok": False, "description": resp.text[:200]}
        if resp.ok and body.get("ok"):
            result = body.get("result")
            return {"message_id": result.get("message_id") if isinstance(result, dict) else None, "result": result}
        description = str(body.get("description") or resp.reason)
        if resp.status_code == 429:
            retry_after = (body.get("parameters") or {}).get("retry_after")
            raise DeliveryError(f"Telegram {method}: rate limited ({description})",
                                retry_after=float(retry_after) if retry_after is not None else None)
        if resp.status_code == 400 and "message_thread_id" in data and \
                any(s in description.lower() for s in THREAD_GONE):
            rest = {k: v for k, v in data.items() if k != "message_thread_id"}
            for upload in (files or {}).values():
                upload[1].seek(0)
            outcome = self._call(method, rest, files)
            return {**outcome, "thread_fallback": True}
        if resp.status_code >= 500:
            raise DeliveryError(f"Telegram {method}: {resp.status_code} {description}")
        raise PluginError(f"Telegram refused {method}: {description}")


def _suffix(ref: FileRef) -> str:
    """The lower-case name (or URL path) that tells a voice note from a music file; '' for a file_id."""
    if ref.kind == URL:
        return urlsplit(ref.value).path.lower()
    return ref.value.lower() if ref.kind == ARTIFACT else ""


def _int(value: str) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
