"""Plugins used only by the test suite (loaded through REKKU_PLUGIN_PATH).

Each records what it did in files under $REKKU_HOME/testkit, so tests can count real invocations
across worker processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from rekku.plugin import AIPluginBase, TransientError, current_action, get_settings, register_plugin


def _journal(name: str) -> Path:
    path = get_settings().home_dir / "testkit"
    path.mkdir(exist_ok=True)
    return path / name


def note(action_id: str, event: str) -> None:
    with open(_journal(f"{action_id}.log"), "a") as fh:
        fh.write(f"{event} {os.getpid()}\n")


class TestKit(AIPluginBase):
    def __init__(self) -> None:
        register_plugin("testkit", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["tk_sleep", "tk_fail", "tk_flaky", "tk_whoami", "tk_hang", "tk_trainer", "tk_io", "tk_sync",
                "tk_poison"]

    def get_supported_actions(self) -> dict:
        return {
            "tk_sleep": {"description": "sleep `seconds` (`first_run_seconds` on attempt 1), journaling start and end",
                         "required_fields": ["seconds"], "optional_fields": ["first_run_seconds"]},
            "tk_fail": {"description": "raise ValueError", "required_fields": [], "optional_fields": ["message"]},
            "tk_flaky": {"description": "TransientError until attempt `succeed_on`",
                         "required_fields": ["succeed_on"], "optional_fields": [], "max_retries": 5},
            "tk_whoami": {"description": "return context, pid and event loop id",
                          "required_fields": [], "optional_fields": []},
            "tk_hang": {"description": "never finishes", "required_fields": [], "optional_fields": [],
                        "time_limit": 2},
            "tk_trainer": {"description": "trainer-only no-op", "required_fields": [], "optional_fields": [],
                           "trainer_only": True},
            "tk_io": {"description": "runs on the io pool", "required_fields": [], "optional_fields": [],
                      "pool": "io"},
            "tk_sync": {"description": "a synchronous handler", "required_fields": [], "optional_fields": []},
            "tk_poison": {"description": "journals its start, then SIGKILLs its own process (a poison message)",
                          "required_fields": [], "optional_fields": []},
        }

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if action_type == "tk_sleep" and not isinstance(payload.get("seconds"), (int, float)):
            return ["Field 'seconds' must be a number for action 'tk_sleep'"]
        return []

    def handle_custom_action(self, action_type: str, payload: dict):
        if action_type == "tk_poison":
            note(current_action().action_id, "start")
            os.kill(os.getpid(), signal.SIGKILL)
        if action_type == "tk_sync":
            ctx = current_action()
            return {"sync": True, "action_id": ctx.action_id, "pid": os.getpid()}
        return self._handle(action_type, payload)

    async def _handle(self, action_type: str, payload: dict):
        ctx = current_action()
        if action_type == "tk_sleep":
            note(ctx.action_id, "start")
            seconds = payload["seconds"]
            if "first_run_seconds" in payload and ctx.attempt == 1:  # a run that must outlive its node
                seconds = payload["first_run_seconds"]
            ctx.report_progress("sleeping", seconds=seconds)
            await asyncio.sleep(seconds)
            note(ctx.action_id, "done")
            return {"slept": payload["seconds"], "attempt": ctx.attempt}
        if action_type == "tk_fail":
            raise ValueError(payload.get("message", "this action always fails"))
        if action_type == "tk_flaky":
            note(ctx.action_id, f"attempt{ctx.attempt}")
            if ctx.attempt < payload["succeed_on"]:
                raise TransientError(f"not yet (attempt {ctx.attempt})", retry_after=0.2)
            return {"attempt": ctx.attempt}
        if action_type == "tk_whoami":
            return {"pid": os.getpid(), "loop": id(asyncio.get_running_loop()),
                    "context": {k: getattr(ctx, k) for k in ("interface", "chat_id", "user_id", "worker")},
                    "at": time.time()}
        if action_type == "tk_hang":
            note(ctx.action_id, "start")
            await asyncio.sleep(3600)
        return {"ok": True, "type": action_type}


PLUGIN_CLASS = TestKit


