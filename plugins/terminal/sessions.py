"""Which terminal node holds which persistent session, and which nodes are alive: kept in Redis.

Keys, in the broker's Redis db:

- ``rekku:terminal:node:<node>`` — JSON ``{"sessions", "pid"}``; each terminal worker refreshes it
  every third of ``TERMINAL_NODE_TTL``, so it disappears that long after the node dies.
- ``rekku:terminal:nodes`` — sorted set node → expiry time: the index of the keys above, so finding
  live nodes never scans the broker's keyspace.
- ``rekku:terminal:session:<name>`` — hash ``node``, ``shell`` (id of the shell holding its state,
  absent while reserved), ``lost_from`` (a dead node whose shell it had), ``created_at``,
  ``last_used``; it expires when the session has been idle longer than the node closes it.

The ingress claims a session for a live node before enqueuing its command (so the commands of one
batch all reach the same node), and routes it to that node's queue ``terminal.<node>``. A claim
never takes a session from a live node; from a dead one it takes it and records ``lost_from``, so
the node that runs the next command can say the session was lost.
"""

from __future__ import annotations

import json
import os
import random
import time

import redis

from rekku.plugin import broker_client

from .settings import TerminalSettings

NODE_PREFIX = "rekku:terminal:node:"
SESSION_PREFIX = "rekku:terminal:session:"
NODE_INDEX = "rekku:terminal:nodes"

#: KEYS[1] session; ARGV: node prefix, candidate node, ttl seconds, now. Returns the owner after the claim.
_CLAIM = """
local owner = redis.call('HGET', KEYS[1], 'node')
if owner and (owner == ARGV[2] or redis.call('EXISTS', ARGV[1] .. owner) == 1) then return owner end
local lost = false
if owner then
  if redis.call('HGET', KEYS[1], 'shell') then lost = owner else lost = redis.call('HGET', KEYS[1], 'lost_from') end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'created_at', ARGV[4], 'last_used', ARGV[4])
if lost then redis.call('HSET', KEYS[1], 'lost_from', lost) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return ARGV[2]
"""

#: KEYS[1] session; ARGV[1] shell id ('' = any). Deletes the entry only if it still names that shell.
_RELEASE = """
if ARGV[1] == '' or redis.call('HGET', KEYS[1], 'shell') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SessionRegistry:
    """Session → node map and node liveness."""

    def __init__(self, client: redis.Redis, node_ttl: float = 10.0, session_ttl: float = 960.0) -> None:
        self.client = client
        self.node_ttl, self.session_ttl = node_ttl, session_ttl
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: TerminalSettings) -> SessionRegistry:
        """On the broker's Redis (its Sentinel master, when it is one: rekku/broker.py)."""
        return cls(broker_client(timeout=5), settings.node_ttl, settings.session_idle + 3 * settings.node_ttl)

    # ------------------------------------------------------------------ nodes
    def beat(self, node: str, sessions: int) -> None:
        now = time.time()
        pipe = self.client.pipeline()
        pipe.set(NODE_PREFIX + node, json.dumps({"sessions": sessions, "pid": os.getpid()}),
                 px=int(self.node_ttl * 1000))
        pipe.zadd(NODE_INDEX, {node: now + self.node_ttl})
        pipe.zremrangebyscore(NODE_INDEX, "-inf", now - 3600)  # nodes gone for an hour
        pipe.execute()

    def forget_node(self, node: str) -> None:
        pipe = self.client.pipeline()
        pipe.delete(NODE_PREFIX + node)
        pipe.zrem(NODE_INDEX, node)
        pipe.execute()

    def alive(self, node: str | None) -> bool:
        return bool(node) and bool(self.client.exists(NODE_PREFIX + node))

    def live_nodes(self) -> dict[str, dict]:
        names = [n.decode() for n in self.client.zrangebyscore(NODE_INDEX, time.time() - 1, "+inf")]
        values = self.client.mget([NODE_PREFIX + n for n in names]) if names else []
        return {name: json.loads(value) for name, value in zip(names, values) if value is not None}

    def choose_node(self) -> str | None:
        """The live node with the fewest sessions (ties broken at random), or None."""
        nodes = self.live_nodes()
        if not nodes:
            return None
        fewest = min(info.get("sessions", 0) for info in nodes.values())
        return random.choice(sorted(n for n, info in nodes.items() if info.get("sessions", 0) == fewest))

    # ------------------------------------------------------------------ sessions
    def claim(self, name: str, candidate: str) -> str:
        """The session's live owner; if it has none, ``candidate`` becomes the owner."""
        owner = self._claim(keys=[SESSION_PREFIX + name],
                            args=[NODE_PREFIX, candidate, int(self.session_ttl), f"{time.time():.3f}"])
        return owner.decode() if isinstance(owner, bytes) else owner

    def route(self, name: str) -> str | None:
        """The node that will run the session's next command (claimed for it), or None if no node is alive."""
        candidate = self.choose_node()
        if candidate is None:
            return None
        return self.claim(name, candidate)

    def entry(self, name: str) -> dict[str, str] | None:
        raw = self.client.hgetall(SESSION_PREFIX + name)
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    def bind(self, name: str, node: str, shell_id: str) -> None:
        """Record that ``shell_id`` on ``node`` now holds the session's state."""
        key = SESSION_PREFIX + name
        now = f"{time.time():.3f}"
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"node": node, "shell": shell_id, "last_used": now})
        pipe.hdel(key, "lost_from")
        pipe.expire(key, int(self.session_ttl))
        pipe.execute()

    def touch(self, name: str) -> None:
        key = SESSION_PREFIX + name
        pipe = self.client.pipeline()
        pipe.hset(key, "last_used", f"{time.time():.3f}")
        pipe.expire(key, int(self.session_ttl))
        pipe.execute()

    def release(self, name: str, shell_id: str | None = None) -> bool:
        """Forget the session (only if it still names ``shell_id``, when given)."""
        return bool(self._release(keys=[SESSION_PREFIX + name], args=[shell_id or ""]))

    def sessions(self) -> list[dict]:
        keys = sorted(self.client.scan_iter(match=SESSION_PREFIX + "*", count=200))
        pipe = self.client.pipeline()
        for key in keys:
            pipe.hgetall(key)
        live = self.live_nodes()
        out = []
        for key, raw in zip(keys, pipe.execute()):
            if not raw:
                continue
            entry = {k.decode(): v.decode() for k, v in raw.items()}
            out.append({"session": key.decode()[len(SESSION_PREFIX):], "node": entry.get("node"),
                        "node_alive": entry.get("node") in live, "open": "shell" in entry,
                        "created_at": _float(entry.get("created_at")), "last_used": _float(entry.get("last_used")),
                        **({"lost_from": entry["lost_from"]} if "lost_from" in entry else {})})
        return out


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
