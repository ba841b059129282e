"""Bench-only plugin (loaded through REKKU_PLUGIN_PATH): records when its handler starts.

The latency scenario needs the moment a handler begins, seen from outside the worker. The handler
pushes ``time.time()`` onto a Redis list before doing anything else, so the bench can BLPOP it and
subtract the time it sent the request. The bare Celery task in ``bench.bare_app`` does the same.
"""

from __future__ import annotations

import os
import time

import redis

from rekku.plugin import AIPluginBase, get_settings, register_plugin

#: The Redis list the handler pushes its start time onto (the bench reads it with BLPOP).
STAMP_KEY = "bench:stamps:ours"

_client: redis.Redis | None = None
_client_pid: int | None = None


def _redis() -> redis.Redis:
    """One connection per worker process (a prefork child must not reuse its parent's socket)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client, _client_pid = redis.Redis.from_url(get_settings().resolved_broker_url()), os.getpid()
    return _client


class BenchStampPlugin(AIPluginBase):
    idempotent = True

    def __init__(self) -> None:
        register_plugin("bench_stamp", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["bench_stamp"]

    def get_supported_actions(self) -> dict:
        return {"bench_stamp": {"description": "Record the handler's start time in Redis (benchmarks only).",
                                "required_fields": [], "optional_fields": []}}

    async def handle_custom_action(self, action_type: str, payload: dict) -> None:
        started = time.time()  # first statement: this is the moment being measured
        _redis().rpush(STAMP_KEY, repr(started))


PLUGIN_CLASS = BenchStampPlugin
