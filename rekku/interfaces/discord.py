"""Discord, through the bot's REST API (``DISCORD_BOT_TOKEN``) or through channel webhooks.

A message goes to its chat id, a channel id (the action's ``target``, else the chat the request came
from), and never anywhere else:

* **bot** (``DISCORD_BOT_TOKEN`` set): ``POST {DISCORD_API_URL}/channels/{id}/messages`` with
  ``Authorization: Bot <token>``, to the channel, or to the thread when there is a ``thread_id``
  (a thread is a channel of its own). Any channel the bot may post in; Discord's refusal (unknown
  channel, missing access) fails the action with Discord's words. Webhooks are not used.
* **webhooks** (no bot token): ``POST <webhook>?wait=true`` with the channel's webhook from
  ``DISCORD_WEBHOOK_URLS`` (``channel_id=url,...``), or ``DISCORD_WEBHOOK_URL`` when the channel is
  that webhook's own channel (the default channel: where an action with no target goes when its
  request came from no Discord chat); a ``thread_id`` posts into that thread (``&thread_id=``).
  Which channel a webhook posts to is asked of Discord (``GET <webhook>``, once per process), so a
  mapping that names the wrong channel is refused instead of posting elsewhere. A channel that no
  webhook reaches fails the action, naming the channels that are configured.

Texts are split at Discord's 2,000 characters (rekku.interfaces.delivery); a reply carries a
``message_reference``; mentions are never parsed. A 429's ``retry_after`` becomes the retry's delay,
a 5xx is retried, any other refusal fails the action.

Audio (``audio_discord_bot``) follows the one file rule (rekku.artifacts.classify_file_ref): an
artifact's bytes are uploaded as ``files[0]`` (opened by :func:`rekku.artifacts.open_artifact`), an
http(s) URL is posted as a link (Discord shows it; Rekku never downloads it). Discord has no file ids
to pass on, and no local path is ever opened.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any
from urllib.parse import urlencode

import requests

from rekku.artifacts import ARTIFACT, FileRefRefused, open_artifact
from rekku.errors import DeliveryError, PluginError
from rekku.interfaces import _http
from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.registry import register_interface
from rekku.settings import Settings

#: A Discord id (a "snowflake"): what may stand in the bot API's path.
SNOWFLAKE = re.compile(r"[0-9]{1,20}")


@register_interface
class DiscordBot(Interface):
    name = "discord_bot"
    max_text = 2000
    audio = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.token = settings.discord_bot_token
        self.api = settings.discord_api_url.rstrip("/")
        self.webhooks = {} if self.token else settings.discord_webhooks
        self._hook_channels: dict[str, str] = {}  # webhook URL -> the channel Discord says it posts to
        self._local = threading.local()

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        if settings.discord_bot_token:
            return None
        try:
            webhooks = settings.discord_webhooks
        except ValueError as exc:
            return str(exc)
        if webhooks or settings.discord_webhook_url:
            return None
        return "none of DISCORD_BOT_TOKEN, DISCORD_WEBHOOK_URLS, DISCORD_WEBHOOK_URL is set"

    @property
    def http(self) -> requests.Session:
        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def default_chat(self) -> str | None:
        if self.token or not self.settings.discord_webhook_url:
            return None
        return self._channel_of(self.settings.discord_webhook_url, "DISCORD_WEBHOOK_URL")

    def send(self, message: Outgoing) -> dict[str, Any]:
        ref = self.checked_audio(message.audio) if message.audio is not None else None  # before anything else
        url, headers = self._route(message)
        body: dict[str, Any] = {"content": message.text or "", "allowed_mentions": {"parse": []}}
        if message.reply_to:
            body["message_reference"] = {"message_id": message.reply_to, "fail_if_not_exists": False}
        if ref is None:
            return self._post(url, headers, json=body)
        if ref.kind != ARTIFACT:  # an http(s) URL: posted as a link
            return self._post(url, headers, json={**body, "content": ref.value})
        try:
            fh = open_artifact(ref.value, self.settings)
        except FileRefRefused as exc:  # changed since it was checked a moment ago
            raise self.audio_refused(exc) from None
        with fh:
            body["attachments"] = [{"id": 0, "filename": ref.value}]
            return self._post(url, headers, data={"payload_json": json.dumps(body)},
                              files={"files[0]": (ref.value, fh, "application/octet-stream")})

    # ------------------------------------------------------------------ where a message goes
    def _route(self, message: Outgoing) -> tuple[str, dict[str, str]]:
        """The URL to POST ``message`` to, and its headers; PluginError when nothing configured reaches it."""
        if self.token:
            channel = message.thread_id or message.chat_id
            if not SNOWFLAKE.fullmatch(channel):
                raise PluginError(f"Discord channel and thread ids are numbers; {channel[:40]!r} is not one")
            return f"{self.api}/channels/{channel}/messages", {"Authorization": f"Bot {self.token}"}
        hook = self._webhook_of(message.chat_id)
        query = {"wait": "true", **({"thread_id": message.thread_id} if message.thread_id else {})}
        return f"{hook}{'&' if '?' in hook else '?'}{urlencode(query)}", {}

    def _webhook_of(self, channel: str) -> str:
        mapped = self.webhooks.get(channel)
        if mapped is not None:
            actual = self._channel_of(mapped, f"the DISCORD_WEBHOOK_URLS webhook of channel {channel}")
            if actual != channel:
                raise PluginError(f"DISCORD_WEBHOOK_URLS gives channel {channel} a webhook that posts to channel "
                                  f"{actual}; nothing was sent (fix that entry)")
            return mapped
        default = self.settings.discord_webhook_url
        default_channel = self._channel_of(default, "DISCORD_WEBHOOK_URL") if default else None
        if default and channel == default_channel:
            return default
        configured = ([f"DISCORD_WEBHOOK_URLS has channels {', '.join(sorted(self.webhooks))}"] if self.webhooks
                      else []) + ([f"DISCORD_WEBHOOK_URL posts to channel {default_channel}"] if default else [])
        raise PluginError(f"No Discord webhook reaches channel {channel[:40]!r} ({'; '.join(configured)}); "
                          "nothing was sent. Add its webhook to DISCORD_WEBHOOK_URLS, or set DISCORD_BOT_TOKEN")

    def _channel_of(self, webhook: str, what: str) -> str:
        """The channel ``webhook`` posts to, as Discord says (``GET <webhook>``), asked once per process."""
        channel = self._hook_channels.get(webhook)
        if channel is None:
            resp = _http.get(self.http, webhook, self.settings.interface_timeout, f"Discord {what}")
            answer = _answer(resp)
            if not (resp.ok and answer.get("channel_id")):
                raise _failure(resp, answer, what)
            channel = self._hook_channels[webhook] = str(answer["channel_id"])
        return channel

    # ------------------------------------------------------------------ the call
    def _post(self, url: str, headers: dict[str, str], **kwargs: Any) -> dict[str, Any]:
        resp = _http.post(self.http, url, self.settings.interface_timeout, "Discord", headers=headers, **kwargs)
        answer = _answer(resp)
        if resp.ok:
            return {"message_id": answer.get("id")}
        raise _failure(resp, answer, "the message")


def _answer(resp: requests.Response) -> dict[str, Any]:
    try:
        answer = resp.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _failure(resp: requests.Response, answer: dict[str, Any], what: str) -> PluginError:
    """A refusal as the error to raise: 429 and 5xx are retried (DeliveryError), the rest fail for good."""
    if resp.status_code == 429:
        return DeliveryError(f"Discord: rate limited ({what})", retry_after=_retry_after(resp, answer))
    if resp.status_code >= 500:
        return DeliveryError(f"Discord answered {resp.status_code} ({what})")
    return PluginError(f"Discord refused {what}: {resp.status_code} {answer.get('message') or resp.text[:200]}")


def _retry_after(resp: requests.Response, answer: dict[str, Any]) -> float:
    """Seconds to wait: the body's ``retry_after``, else the ``Retry-After`` header, else one."""
    for value in (answer.get("retry_after"), resp.headers.get("Retry-After")):
        try:
            return max(float(value), 0.0)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return 1.0
