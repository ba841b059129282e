"""The four worker pools of docs/contracts.md §5 and how `rekku worker --pool NAME` starts each.

A pool is a queue plus the Celery settings that suit its work: database plugins on prefork,
interface sends on threads (they wait on the network), one browser per selenium process with
prefetch 1, and terminal nodes that also listen on their own ``terminal.<node>`` queue so
persistent sessions stay on the node that holds their shell.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolSpec:
    name: str
    #: Celery execution pool: prefork (isolated processes) or threads (many waits at once).
    celery_pool: str
    #: Processes or threads per node when not overridden.
    concurrency: int
    #: Messages each process reserves ahead; 1 keeps long actions from queueing behind each other.
    prefetch: int = 1
    #: Restart a prefork child after this many tasks (bounds leaks in browsers and plugins).
    max_tasks_per_child: int | None = None
    #: Also consume the node's own queue ``<name>.<node>``.
    node_queue: bool = False
    #: Other queues this pool consumes too.
    extra_queues: tuple[str, ...] = ()

    def queues(self, node: str) -> list[str]:
        return [self.name] + list(self.extra_queues) + ([f"{self.name}.{node}"] if self.node_queue else [])


#: The pools, by name (= queue name).
#: Celery's own default queue: a plain ``Celery(broker=...)`` app that knows nothing of Rekku's routes
#: sends ``send_task("rekku.ingest", ...)`` there, so the default pool consumes it too (README).
CELERY_DEFAULT_QUEUE = "celery"

POOLS: dict[str, PoolSpec] = {
    "default": PoolSpec("default", "prefork", concurrency=min(4, os.cpu_count() or 1), prefetch=4,
                        extra_queues=(CELERY_DEFAULT_QUEUE,)),
    "io": PoolSpec("io", "threads", concurrency=16, prefetch=1),
    "selenium": PoolSpec("selenium", "prefork", concurrency=1, prefetch=1, max_tasks_per_child=None),
    # Threads, not prefork: a node's persistent shells must all live in ONE process (the session host
    # of plugins/terminal/host.py) that every task of the node reaches; commands are subprocesses.
    "terminal": PoolSpec("terminal", "threads", concurrency=4, prefetch=1, node_queue=True),
}


def node_name() -> str:
    return socket.gethostname()


def worker_argv(pool: str, concurrency: int | None = None, node: str | None = None,
                loglevel: str = "INFO") -> list[str]:
    """Arguments for ``celery -A rekku.celery_app worker`` running ``pool``."""
    spec = POOLS[pool]
    node = node or node_name()
    argv = [
        "-A", "rekku.celery_app", "worker",
        "-Q", ",".join(spec.queues(node)),
        "-P", spec.celery_pool,
        "-c", str(concurrency or spec.concurrency),
        "-n", f"{pool}@{node}",
        "--prefetch-multiplier", str(spec.prefetch),
        "-E", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]
    if spec.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(spec.max_tasks_per_child)]
    return argv
