"""Prompt injections that misbehave, for GET /v1/prompt's tests (inert unless their env var is set).

``slow_injector``, when REKKU_TEST_SLOW_INJECTION=1 and the message text contains "slow", hangs
until the test lets it go: it writes "started" to ``$REKKU_HOME/slow_injector/calls``, waits for the
file ``$REKKU_HOME/slow_injector/release`` (two minutes at most), then writes "finished". A test sees
from that file whether a prompt answered while the injection still ran, and whether a later prompt
called it again. ``failing_injector`` raises when REKKU_TEST_FAILING_INJECTION=1. Other stacks load
them too, and there they return nothing at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rekku.plugin import AIPluginBase, register_plugin

#: The longest the slow injection hangs when nobody releases it (a test that failed half way).
MAX_HANG = 120.0


def _text(message: dict | None) -> str:
    return str(((message or {}).get("payload") or {}).get("text") or "")


def record_dir(home: str | os.PathLike) -> Path:
    """Where the slow injection records its calls and waits for its release."""
    return Path(home) / "slow_injector"


class FailingInjector(AIPluginBase):
    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        if os.environ.get("REKKU_TEST_FAILING_INJECTION") == "1":
            raise RuntimeError("the failing injector failed, as asked")
        return {}


class SlowInjector(AIPluginBase):
    def __init__(self) -> None:
        register_plugin("slow_injector", self)
        register_plugin("failing_injector", FailingInjector())

    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        if os.environ.get("REKKU_TEST_SLOW_INJECTION") == "1" and "slow" in _text(message):
            records = record_dir(os.environ["REKKU_HOME"])
            records.mkdir(exist_ok=True)
            with open(records / "calls", "a") as calls:
                calls.write("started\n")
            deadline = time.monotonic() + MAX_HANG
            while not (records / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(records / "calls", "a") as calls:
                calls.write("finished\n")
            return {"slow_value": "too late"}
        return {"quick_value": "on time"} if os.environ.get("REKKU_TEST_SLOW_INJECTION") == "1" else {}


PLUGIN_CLASS = SlowInjector
