"""An action that returns its payload: the smallest real path through ingress, worker and log.

Useful to check a deployment end to end (``rekku submit`` an echo and ``--wait``), and as the
no-op the benchmarks measure.
"""

from rekku.plugin import AIPluginBase, register_plugin


class EchoPlugin(AIPluginBase):
    #: Running it twice has no effect beyond returning the same value.
    idempotent = True

    def __init__(self) -> None:
        register_plugin("echo", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["echo"]

    def get_supported_actions(self) -> dict:
        return {
            "echo": {
                "description": "Return the payload unchanged (a no-op to test the pipeline).",
                "required_fields": [],
                "optional_fields": ["text", "data"],
            }
        }

    def get_prompt_instructions(self, action_name: str) -> dict:
        if action_name != "echo":
            return {}
        return {
            "description": "Echo a value back as the action's result.",
            "payload": {
                "text": {"type": "string", "description": "Any text"},
                "data": {"type": "object", "description": "Any JSON value"},
            },
        }

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if "text" in payload and not isinstance(payload["text"], str):
            return ["Field 'text' must be a string for action 'echo'"]
        return []

    async def handle_custom_action(self, action_type: str, payload: dict):
        return payload


PLUGIN_CLASS = EchoPlugin
