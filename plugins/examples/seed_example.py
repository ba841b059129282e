from core.ai_plugin_base import AIPluginBase
from core.core_initializer import core_initializer, register_plugin


class MyActionPlugin(AIPluginBase):
    def __init__(self):
        # Register with the core system
        register_plugin("myplugin", self)
        core_initializer.register_plugin("myplugin")

    @staticmethod
    def get_supported_action_types() -> list[str]:
        """Return action types this plugin handles."""
        return ["my_action"]

    def get_supported_actions(self) -> dict:
        """Return schema for all supported actions."""
        return {
            "my_action": {
                "description": "Perform a custom action",
                "required_fields": ["value"],
                "optional_fields": ["option"],
            }
        }

    def get_prompt_instructions(self, action_name: str) -> dict:
        """Provide LLM instructions for using this action."""
        if action_name == "my_action":
            return {
                "description": "Execute my custom action with a value.",
                "payload": {
                    "value": {"type": "string", "description": "The value to process"},
                    "option": {"type": "boolean", "description": "Optional flag"}
                }
            }
        return {}

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        """Validate action payload before execution."""
        errors = []
        if action_type == "my_action" and "value" not in payload:
            errors.append("payload.value is required")
        return errors

    async def handle_custom_action(self, action_type: str, payload: dict):
        """Execute the action logic."""
        if action_type == "my_action":
            # Perform your action here
            result = process_value(payload["value"])
            return result

# Required: Export the plugin class
PLUGIN_CLASS = MyActionPlugin
