"""Asking for a model turn (the optional model loop, rekku/model_loop.py): the one place that publishes
``rekku.model.turn``, by name, and the per-chat Redis keys that coalesce such requests.

Called after something the model must see for a chat was committed: a stored message
(rekku.messages.receive) and the feed items added by :func:`rekku.feed.append_now` (outputs, event
reminders, failures, corrections). Without ``REKKU_LLM_URL`` :func:`request_turn` does nothing and
nothing here touches Redis. The coalescing scheme is described in rekku/model_loop.py; its keys and
the two atomic steps that publish and that end a turn are here, so both sides agree on them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import redis

from rekku.broker import broker_client
from rekku.celery_app import app
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The turn task's name and queue (docs/contracts.md §8).
TURN_TASK, TURN_QUEUE = "rekku.model.turn", "io"
#: Seconds a "queued" mark lives: a turn message lost with the broker stops coalescing after it.
QUEUED_TTL = 600
#: Seconds a "dirty" mark lives (longer than any turn; it only says "look again").
DIRTY_TTL = 3600

#: Publish unless a turn of the chat runs or is queued: set "dirty" (a running turn sees it when it
#: ends); if no turn holds the lock, mark "queued" (NX) and answer 1 = publish one.
_TRIGGER = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""
#: The end of a turn, atomic with _TRIGGER: if "dirty" was set meanwhile, consume it, keep the lock
#: and answer 1 (run once more); else release the lock (if still ours) and answer 0; -1: not ours.
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
"""
_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"""
#: Give the lock up without looking at "dirty" (a turn that retries later): mark "queued" first, so
#: triggers meanwhile coalesce into the retry instead of publishing another turn.
_YIELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def chat_of(interface: Any, chat_id: Any, thread_id: Any = None) -> tuple[str, str, str]:
    """A chat as the loop keys it: (interface, chat_id, thread_id), text, empty for none."""
    return str(interface or ""), str(chat_id or ""), str(thread_id or "")


def chat_hash(chat: tuple[str, str, str]) -> str:
    """A short fixed-length name of a chat for keys (its ids may hold anything, up to 191 characters)."""
    return hashlib.sha256("\x1f".join(chat).encode()).hexdigest()[:24]


def keys(chat: tuple[str, str, str]) -> dict[str, str]:
    """The chat's Redis keys: ``dirty`` (something new since the running turn read), ``queued`` (a
    turn message waits), ``lock`` (a turn runs; its value is the holder's token), ``chain`` (turns in a
    row started by the chat's own outputs alone)."""
    name = chat_hash(chat)
    return {k: f"rekku:turn:{k}:{name}" for k in ("dirty", "queued", "lock", "chain")}


def redis_client(settings: Settings | None = None) -> redis.Redis:
    """The broker's Redis (the loop's coordination lives next to its messages)."""
    return broker_client(settings or get_settings(), timeout=5)


def request_turn(interface: Any, chat_id: Any, thread_id: Any = None, *, settings: Settings | None = None) -> bool:
    """Ask for a turn of the model for this chat (after the commit of what it should see). Coalesced:
    publishes only when no turn of the chat is queued or running. Never raises (what was committed
    stays on the feed; the next trigger, or the running turn, picks it up). True when one was published."""
    settings = settings or get_settings()
    if not settings.model_loop or not chat_id:
        return False
    chat = chat_of(interface, chat_id, thread_id)
    k = keys(chat)
    try:
        publish = redis_client(settings).eval(_TRIGGER, 3, k["dirty"], k["queued"], k["lock"], DIRTY_TTL, QUEUED_TTL)
        if not publish:
            return False
        app.send_task(TURN_TASK, kwargs={"interface": chat[0], "chat_id": chat[1], "thread_id": chat[2]},
                      queue=TURN_QUEUE, ignore_result=True, retry=True,
                      retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2})
        return True
    except Exception:
        log.exception("could not ask for a model turn of chat %s:%s", chat[0], chat[1])
        try:  # let the next trigger publish
            redis_client(settings).delete(k["queued"])
        except Exception:
            pass
        return False


def request_turns_for(chats: list[tuple[str, str, str]], settings: Settings | None = None) -> None:
    """:func:`request_turn` once per distinct chat."""
    for chat in dict.fromkeys(chats):
        request_turn(*chat, settings=settings)


def finish(chat: tuple[str, str, str], token: str, lease_ms: int, client: redis.Redis) -> int:
    """End a turn atomically with the triggers: 1 = something came meanwhile, run once more (the lock is
    kept); 0 = released; -1 = the lock was no longer ours."""
    k = keys(chat)
    return int(client.eval(_FINISH, 2, k["lock"], k["dirty"], token, lease_ms))


def release(chat: tuple[str, str, str], token: str, client: redis.Redis) -> None:
    """Release the lock if still ours, nothing else (a turn that failed unexpectedly: the next trigger
    starts the next turn)."""
    client.eval(_RELEASE, 1, keys(chat)["lock"], token)


def give_up_lock(chat: tuple[str, str, str], token: str, client: redis.Redis) -> None:
    """Release the lock for a retry later, leaving the chat marked queued (triggers coalesce into it)."""
    k = keys(chat)
    client.eval(_YIELD, 2, k["lock"], k["queued"], token, QUEUED_TTL)
