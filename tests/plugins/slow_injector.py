"""Prompt injections that misbehave, for GET /v1/prompt's tests (inert unless their env var is set).

``slow_injector`` sleeps 4 s when REKKU_TEST_SLOW_INJECTION=1 and the message text contains
"slow"; ``failing_injector`` raises when REKKU_TEST_FAILING_INJECTION=1. Other stacks load them too,
and there they return nothing at once.
"""

from __future__ import annotations

import os
import time

from rekku.plugin import AIPluginBase, register_plugin


def _text(message: dict | None) -> str:
    return str(((message or {}).get("payload") or {}).get("text") or "")


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
            time.sleep(4)
            return {"slow_value": "too late"}
        return {"quick_value": "on time"} if os.environ.get("REKKU_TEST_SLOW_INJECTION") == "1" else {}


PLUGIN_CLASS = SlowInjector
