"""What the broker says about the fleet right now: messages waiting per pool and worker nodes up per pool.

Read on the process's one broker client (rekku.broker.broker_client): queue depth as ``/metrics``
counts it (the length of each pool's list), and a node as up while its heartbeat key lives
(``rekku:worker:<pool>@<node>``, refreshed by workers/heartbeat.py; rekku.reconciler reads the same keys).
"""

from __future__ import annotations

import redis

from rekku.broker import broker_client
from rekku.pools import POOLS
from rekku.reconciler import HEARTBEAT_PREFIX


def queue_depths(client: redis.Redis | None = None) -> dict[str, int]:
    """Messages waiting in each pool's queue."""
    client = client or broker_client(timeout=2)
    pipe = client.pipeline(transaction=False)
    for pool in POOLS:
        pipe.llen(pool)
    return dict(zip(POOLS, pipe.execute(), strict=True))


def workers_up(client: redis.Redis | None = None) -> dict[str, list[str]]:
    """The nodes (``pool@node``) of each pool whose heartbeat is alive, sorted; every pool is named."""
    client = client or broker_client(timeout=2)
    up: dict[str, list[str]] = {pool: [] for pool in POOLS}
    for key in client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000):
        name = key.decode(errors="replace")[len(HEARTBEAT_PREFIX):]
        if "#" in name:  # one incarnation's key; its node's key counts the node once
            continue
        pool, at, _node = name.partition("@")
        if at:
            up.setdefault(pool, []).append(name)
    return {pool: sorted(nodes) for pool, nodes in up.items()}
