"""Test plugin for the ingress hooks (check_request, on_request) and plugin periodic tasks.

``on_request`` hangs once per chat for the user :data:`HANG_USER`: it writes
``$REKKU_HOME/testkit/hang-<chat>.log`` and sleeps :data:`MAX_HANG` seconds. ``rekku.messages.receive``
calls it after the message is stored, so a test can kill the Telegram receiver between storing a
message and saving its offset."""

from __future__ import annotations

import time

from rekku.plugin import AIPluginBase, get_settings, register_plugin


def _journal(name: str):
    path = get_settings().home_dir / "testkit"
    path.mkdir(exist_ok=True)
    return path / name



#: The user whose first request in a chat makes on_request hang (see the module's docstring), and how long.
HANG_USER, MAX_HANG = "666013", 120.0


class Gatekeeper(AIPluginBase):
    """Exercises the ingress hooks: refuses requests from users 'blocked-user' and '7000', counts chats seen, ticks."""

    def __init__(self) -> None:
        register_plugin("gatekeeper", self)

    def check_request(self, context: dict) -> str | None:
        if context.get("user_id") in ("blocked-user", "7000"):  # 7000 is also a trainer on webhook
            return f"User {context['user_id']} is blocked"
        return None

    def on_request(self, context: dict) -> None:
        if context.get("chat_id"):
            with open(_journal(f"chat-{context['chat_id']}.log"), "a") as fh:
                fh.write("seen\n")
            hang = _journal(f"hang-{context['chat_id']}.log")
            if context.get("user_id") == HANG_USER and not hang.exists():
                hang.write_text("hanging\n")
                time.sleep(MAX_HANG)

    def periodic_tasks(self) -> dict:
        return {"tick": {"every": 0.5, "run": self.tick, "pool": "default"}}

    async def tick(self) -> None:
        with open(_journal("ticks.log"), "a") as fh:
            fh.write(f"{time.time()}\n")


PLUGIN_CLASS = Gatekeeper
