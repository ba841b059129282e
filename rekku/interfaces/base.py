"""What an interface is: a place Rekku's messages are delivered to (a chat platform, a webhook, the outbox).

An interface sends one part of a message at a time; splitting, idempotency and cross-platform
forwarding are done once for all of them in :mod:`rekku.interfaces.delivery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rekku.errors import DeliveryError
from rekku.settings import Settings


class DeliveryUncertain(DeliveryError):
    """The platform may or may not have the message (e.g. the answer timed out): it is never sent again."""


@dataclass(frozen=True)
class Outgoing:
    """One part of a message, as an interface sends it."""

    chat_id: str
    text: str | None = None
    #: A local file path or a URL of an audio file.
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def unavailable_reason(cls, settings: Settings) -> str | None:
        """Why this interface cannot run here (a missing credential), or None."""
        return None

    def send(self, message: Outgoing) -> dict[str, Any]:
        """Deliver one part. Raise DeliveryError when it was surely not delivered (it will be retried),
        DeliveryUncertain when it may have been, PluginError when the platform refused it for good."""
        raise NotImplementedError

    def store(self, session: Any, message: Outgoing) -> dict[str, Any]:
        """For ``stored`` interfaces: write the message with ``session`` (committed with its delivery record)."""
        raise NotImplementedError

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
