"""Worker pool definitions: which queue, which Celery pool, how many at once, what each process holds."""

from workers.pools import POOLS, PoolSpec, worker_argv

__all__ = ["POOLS", "PoolSpec", "worker_argv"]
