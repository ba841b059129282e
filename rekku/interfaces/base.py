"""What an interface is: a place Rekku's messages are delivered to (a chat platform, a webhook, the outbox).

An interface sends one part of a message at a time; splitting, idempotency and cross-platform
forwarding are done once for all of them in :mod:`rekku.interfaces.delivery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rekku.artifacts import ARTIFACT, PLATFORM_FILE_ID, URL, FileRef, FileRefRefused, classify_file_ref, url_of
from rekku.errors import DeliveryError, PluginError
from rekku.settings import Settings


class DeliveryUncertain(DeliveryError):
    """The platform may or may not have the message (e.g. the answer timed out): it is never sent again."""


@dataclass(frozen=True)
class Outgoing:
    """One part of a message, as an interface sends it."""

    chat_id: str
    text: str | None = None
    #: The audio as the payload gave it: an artifact name, an http(s) URL or a platform file id
    #: (rekku.artifacts.classify_file_ref). Interfaces read it only through Interface.checked_audio.
    audio: str | None = None
    thread_id: str | None = None
    reply_to: str | None = None
    action_id: str | None = None
    #: Unique per action and part; a receiver may de-duplicate on it.
    key: str = ""
    part: int = 0
    parts: int = 1


class Interface:
    """Base of every interface. Subclasses set ``name`` and implement :meth:`send` (or :meth:`store`)."""

    #: The id in action names (``message_<name>``) and in request contexts (``interface``).
    name: ClassVar[str] = ""
    #: Longest text of one platform message; longer texts are split.
    max_text: ClassVar[int] = 4000
    #: Offers ``audio_<name>``.
    audio: ClassVar[bool] = False
    #: Messages live in our own database: :meth:`store` runs in the delivery record's transaction.
    stored: ClassVar[bool] = False
    #: Takes a platform file id (Telegram's file_id) as audio. Others take artifacts and URLs only:
    #: a file id means nothing outside its platform (an outbox client could not fetch it).
    file_ids: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        """Why this interface cannot run here (a missing credential), or None."""
        return None

    def default_chat(self) -> str | None:
        """Where a message goes when its action names no target and its request came from no chat of this
        interface (Discord's DISCORD_WEBHOOK_URL channel), or None: the action must name one."""
        return None

    def send(self, message: Outgoing) -> dict[str, Any]:
        """Deliver one part. Raise DeliveryError when it was surely not delivered (it will be retried),
        DeliveryUncertain when it may have been, PluginError when the platform refused it for good."""
        raise NotImplementedError

    def store(self, session: Any, message: Outgoing) -> dict[str, Any]:
        """For ``stored`` interfaces: write the message with ``session`` (committed with its delivery record)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ files (the one rule: rekku.artifacts)
    @classmethod
    def audio_kinds(cls) -> tuple[str, ...]:
        """The forms of :func:`rekku.artifacts.classify_file_ref` this interface sends."""
        return (ARTIFACT, URL, PLATFORM_FILE_ID) if cls.file_ids else (ARTIFACT, URL)

    def audio_ref(self, value: object) -> FileRef:
        """``value`` classified by the one rule, and refused (FileRefRefused) when it is a form this
        interface does not send. Used by validation at the ingress and again by the worker."""
        ref = classify_file_ref(value, self.settings)
        if ref.kind not in self.audio_kinds():
            raise FileRefRefused(f"a platform file id means nothing to {self.name} "
                                 "(only the platform that issued it can use it)")
        return ref

    def audio_error(self, value: object, action_type: str, field: str = "audio") -> str | None:
        """The correction for the LLM when ``value`` may not be this interface's audio, else None."""
        try:
            self.audio_ref(value)
        except FileRefRefused as exc:
            return exc.explain(field, action_type, self.audio_kinds())
        return None

    def checked_audio(self, value: object) -> FileRef:
        """Worker side: the message's audio by the same rule, or PluginError (fails the action for good).
        A message queued before validation, or pushed straight to the broker, meets this check."""
        try:
            return self.audio_ref(value)
        except FileRefRefused as exc:
            raise self.audio_refused(exc) from None

    def audio_refused(self, exc: FileRefRefused) -> PluginError:
        """A worker-side refusal as the action's error, worded as the ingress words it."""
        return PluginError(exc.explain("audio", f"audio_{self.name}", self.audio_kinds()))

    def audio_link(self, value: str | None) -> str | None:
        """For interfaces that pass audio on as a link (webhook, outbox): a URL as is, an artifact as
        its ``/v1/artifacts/{name}`` path on the ingress (fetched with the API token)."""
        if value is None:
            return None
        ref = self.checked_audio(value)
        return url_of(ref.value) if ref.kind == ARTIFACT else ref.value

    def describe(self) -> dict[str, Any]:
        actions = [f"message_{self.name}"] + ([f"audio_{self.name}"] if self.audio else [])
        return {"name": self.name, "actions": actions, "max_text": self.max_text}


def split_text(text: str, limit: int) -> list[str]:
    """Cut ``text`` into parts of at most ``limit`` characters, at a line break or space when there is one."""
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = window.rfind("\n")
        if cut < limit // 2:
            cut = window.rfind(" ")
        if cut < limit // 2:
            cut = limit
        parts.append(rest[:cut])
        rest = rest[cut + 1:] if cut < limit else rest[cut:]  # the separator we cut at is dropped
    if rest:
        parts.append(rest)
    return parts
