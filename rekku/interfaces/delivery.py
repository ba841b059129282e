"""Sending a message: split it, deliver each part exactly once per action, and forward it to linked chats.

Each part's record keeps what it said (thread, text, audio): the prompt's chat history is built from
the records ``sent`` (rekku.prompt.chat_history).

The guarantee, per part (``action id`` + destination + part index):

* a part recorded ``sent`` is never sent again, whatever redelivers the task;
* for interfaces that store messages in our database (the outbox) the message and its record are
  written in one transaction: exactly once;
* for platforms over HTTP the record is written ``sending`` *before* the call and ``sent`` after.
  A failure that surely did not deliver (connection refused, an error status) deletes the record,
  so a retry sends that part. A record still ``sending`` on a later delivery means the previous
  holder died (or timed out) in the middle of the call: the platform may have the message, so it is
  **not** sent again and is reported as ``uncertain``. That is at-most-once for the crash window
  (milliseconds around one HTTP call): a duplicate is never produced, a part may be lost.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.db import session_factory
from rekku.errors import PluginError, TransientError
from rekku.interfaces.base import DeliveryUncertain, Interface, Outgoing, split_text
from rekku.interfaces.links import Chat, forwards_from
from rekku.interfaces.models import SENDING, SENT, Delivery
from rekku.interfaces.outbox import prepare_many
from rekku.interfaces.registry import get_interfaces
from rekku.models import utcnow
from rekku.ordering import Rendered

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What happened to one destination of a message."""

    interface: str
    chat_id: str
    thread_id: str | None
    parts: int = 0
    sent: list[Any] = field(default_factory=list)
    already_sent: int = 0
    uncertain: list[int] = field(default_factory=list)
    error: str | None = None
    info: dict = field(default_factory=dict)


def _part_key(chat: Chat, index: int) -> str:
    key = f"{chat.interface}|{chat.chat_id}|{chat.thread_id or ''}|{index}"
    return key if len(key) <= 191 else "h:" + hashlib.sha256(key.encode()).hexdigest()


def _send_part(iface: Interface, message: Outgoing, chat: Chat, report: Report) -> None:
    sessions = session_factory()
    where = (Delivery.action_id == message.action_id, Delivery.part_key == message.key)
    now = utcnow()
    record = {"action_id": message.action_id, "part_key": message.key, "interface": chat.interface,
              "chat_id": chat.chat_id, "thread_id": chat.thread_id or "", "text": message.text,
              "audio": message.audio, "created_at": now, "updated_at": now}
    with sessions.begin() as s:
        status = s.scalar(sa.select(Delivery.status).where(*where))
        if status == SENT:
            report.already_sent += 1
            return
        if status == SENDING:
            report.uncertain.append(message.part)
            log.warning("part %s of action %s to %s may have been delivered by an earlier attempt; "
                        "not sending it again", message.part, message.action_id, chat.label())
            return
        if iface.stored:  # our own database: the message and its record commit together
            info = iface.store(s, message)
            s.execute(sa.insert(Delivery).values(**record, status=SENT, remote_id=str(info.get("message_id"))))
            report.sent.append(info.get("message_id"))
            return
    try:
        with sessions.begin() as s:
            s.execute(sa.insert(Delivery).values(**record, status=SENDING))
    except IntegrityError:  # another delivery of the same task is sending it right now
        report.uncertain.append(message.part)
        return
    try:
        info = iface.send(message)
    except DeliveryUncertain as exc:
        report.uncertain.append(message.part)
        log.warning("part %s of action %s to %s: %s; not sending it again", message.part, message.action_id,
                    chat.label(), exc)
        return
    except BaseException:
        with sessions.begin() as s:  # surely not delivered: a retry may send it
            s.execute(sa.delete(Delivery).where(*where))
        raise
    with sessions.begin() as s:
        s.execute(sa.update(Delivery).where(*where)
                  .values(status=SENT, remote_id=str(info.get("message_id")), updated_at=utcnow()))
    report.sent.append(info.get("message_id"))
    report.info.update({k: v for k, v in info.items() if k != "message_id"})


def _deliver_to(iface: Interface, chat: Chat, action_id: str, text: str | None, audio: str | None,
                reply_to: str | None) -> Report:
    report = Report(chat.interface, chat.chat_id, chat.thread_id)
    pieces: list[tuple[str | None, str | None]] = []
    if audio:
        pieces.append((None, audio))
    if text:
        pieces += [(part, None) for part in split_text(text, iface.max_text)]
    report.parts = len(pieces)
    for index, (part_text, part_audio) in enumerate(pieces):
        message = Outgoing(chat_id=chat.chat_id, text=part_text, audio=part_audio, thread_id=chat.thread_id,
                           reply_to=reply_to if index == 0 else None, action_id=action_id,
                           key=_part_key(chat, index), part=index, parts=len(pieces))
        _send_part(iface, message, chat, report)
    return report


def deliver(chat: Chat, action_id: str, text: str | None = None, audio: str | None = None,
            reply_to: str | None = None, forward: bool = True) -> dict[str, Any]:
    """Deliver a message to ``chat`` and, through chat_link forwards, to the chats linked to it.

    A transient failure anywhere raises (the action is retried and parts already sent are
    skipped); a forward refused for good is reported in the result, not raised, because the
    message already reached its own chat."""
    interfaces = get_interfaces()
    iface = interfaces.get(chat.interface)
    if iface is None:
        reason = interfaces.disabled.get(chat.interface, "no such interface")
        raise PluginError(f"Interface '{chat.interface}' is unavailable: {reason}")
    primary = _deliver_to(iface, chat, action_id, text, audio, reply_to)
    result = _summary(primary)
    if forward:
        result["forwarded"] = [_forward(target, action_id, text, audio) for target in forwards_from(chat)]
    return result


def _forward(target: Chat, action_id: str, text: str | None, audio: str | None) -> dict[str, Any]:
    iface = get_interfaces().get(target.interface)
    if iface is None:
        return {"interface": target.interface, "chat_id": target.chat_id,
                "error": f"interface '{target.interface}' is unavailable"}
    try:
        report = _deliver_to(iface, target, action_id, text, audio, None)
    except TransientError:
        raise
    except PluginError as exc:
        return {"interface": target.interface, "chat_id": target.chat_id, "error": str(exc)}
    return _summary(report)


def deliver_to_outbox_at_once(connection: sa.Connection,
                              messages: list[tuple[str, Chat, str]]) -> list[dict[str, Any]]:
    """Deliver single-part text messages to the outbox in the caller's transaction, all or none: each
    ``(action id, chat, text)`` is stored with its delivery record, as :func:`_send_part` stores one,
    so it is exactly once, but in one statement per table instead of one transaction per part (a
    burst of event reminders). Returns each message's summary, as :func:`deliver` reports a destination
    (without forwards). Raises LookupError when a part was already recorded and ValueError when a text
    needs more than one part or the outbox is not available: nothing is written, and the caller
    delivers one by one, which tells a sent part from one to send."""
    return prepare_outbox_at_once(connection, messages).write()


class OutboxAtOnce:
    """What :func:`deliver_to_outbox_at_once` writes, checked and built when this is made, before the
    outbox order lock (every other writer of the outbox waits while it is held): :meth:`write` takes the
    lock and runs two statements, the messages and their delivery records. A caller that adds more rows
    under the same lock (the event reminders' feed items) prepares those first too."""

    def __init__(self, connection: sa.Connection, messages: list[tuple[str, Chat, str]]) -> None:
        outbox = get_interfaces().get("outbox")
        if outbox is None or not outbox.stored:
            raise ValueError("the outbox is not available")
        if any(chat.interface != "outbox" or len(split_text(text, outbox.max_text)) != 1
               for _, chat, text in messages):
            raise ValueError("a message that is not one part of text for the outbox")
        records = Delivery.__table__
        taken = connection.scalar(sa.select(sa.func.count()).select_from(records)
                                  .where(records.c.action_id.in_([action_id for action_id, _, _ in messages])))
        if taken:
            raise LookupError(f"{taken} parts already recorded")
        now = utcnow()
        self.connection, self.messages = connection, messages
        self.outbox = prepare_many(connection, [
            {"chat_id": chat.chat_id, "thread_id": chat.thread_id or "", "text": text, "audio_url": None,
             "reply_to": None, "action_id": action_id, "created_at": now} for action_id, chat, text in messages])
        self.records = [{"action_id": action_id, "part_key": _part_key(chat, 0), "interface": "outbox",
                         "chat_id": chat.chat_id, "thread_id": chat.thread_id or "", "text": text, "audio": None,
                         "status": SENT, "created_at": now, "updated_at": now}
                        for action_id, chat, text in messages]
        self.rendered = Rendered.of(connection, records, self.records, later=("remote_id",)) \
            if len(messages) > 1 else None
        self.summaries = [_summary(Report("outbox", chat.chat_id, chat.thread_id, parts=1)) for _, chat, _ in messages]

    def write(self) -> list[dict[str, Any]]:
        """Lock the outbox order, store the messages and their records; each message's summary."""
        ids = self.outbox.store()
        remote = [str(mid) for mid in ids]
        if self.rendered is not None:
            self.rendered.insert(self.connection, returning=False, remote_id=remote)
        elif self.records:
            self.connection.execute(sa.insert(Delivery.__table__), [
                {**record, "remote_id": rid} for record, rid in zip(self.records, remote, strict=True)])
        return [{**summary, "sent": [mid]} for summary, mid in zip(self.summaries, ids, strict=True)]


def prepare_outbox_at_once(connection: sa.Connection, messages: list[tuple[str, Chat, str]]) -> OutboxAtOnce:
    """Check and build what :func:`deliver_to_outbox_at_once` writes, without locking or writing
    anything yet: its ``write()`` does (raises as that function does)."""
    return OutboxAtOnce(connection, messages)


def _summary(report: Report) -> dict[str, Any]:
    """The report as a result: empty fields left out, ``sent`` always there. Shallow (no ``asdict``
    deep copy): a burst of event reminders builds tens of thousands of these."""
    out = {}
    for f in fields(report):
        value = getattr(report, f.name)
        if f.name == "sent" or (f.name != "info" and value is not None and value not in ([], 0)):
            out[f.name] = value
    out.update(report.info)
    return out
