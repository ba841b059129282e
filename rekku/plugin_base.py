"""What a plugin is: the seed's ``AIPluginBase`` contract plus the run options we add.

A plugin written exactly like the seed's example works unchanged; everything added here has a
default. Run options (pool, time limit, ...) are plugin class attributes, and any action's schema
may override them with the same key (``{"my_action": {..., "pool": "io"}}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rekku.plugin_settings import PluginSettings

#: The worker pools (queues) an action may run on; see rekku/pools.py.
POOLS = ("default", "io", "selenium", "terminal")

#: Upstream's pseudo action type for plugins that only contribute prompt context.
STATIC_INJECT = "static_inject"


class AIPluginBase:
    """Base class of every action plugin (the seed's contract).

    Class attributes are run options for all of the plugin's actions; an action's schema entry
    may override each of them.
    """

    #: Worker pool (queue) the plugin's actions run on.
    pool: str = "default"
    #: Seconds an action may run before it is stopped and failed; None = the global default.
    time_limit: float | None = None
    #: Celery rate limit string, e.g. "10/m", applied per worker node.
    rate_limit: str | None = None
    #: Retries for TransientError, with exponential backoff.
    max_retries: int = 3
    #: True when running the handler twice has no extra effect (a redelivery may then re-run it).
    idempotent: bool = False
    #: Subject to RESTRICT_ACTIONS (upstream's ``"restricted": true``).
    restricted: bool = False
    #: Only trainers may run it, whatever RESTRICT_ACTIONS says (e.g. terminal).
    trainer_only: bool = False
    #: The plugin's own variables (a ``PluginSettings`` subclass), read and checked before it is built.
    settings_class: type[PluginSettings] | None = None

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return []

    def get_supported_actions(self) -> dict:
        return {}

    def get_prompt_instructions(self, action_name: str) -> dict:
        return {}

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        return []

    async def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not handle '{action_type}'")

    def route_action(self, action_type: str, payload: dict, context: dict) -> str | None:
        """A queue other than the pool's for this one action (e.g. the node holding its session), or None."""
        return None

    # Optional, looked up with getattr so the seed's plugins need none of them:
    #   authorize_payload(action_type, payload, context, is_trainer) -> str | None
    #                                          refuse this payload for this requester (e.g. touching another
    #                                          chat); checked at the ingress and again in the worker
    #   check_request(context) -> str | None   refuse a whole request (e.g. the user is blocked)
    #   on_request(context) -> None            observe every request that was accepted (e.g. chat activity)
    #   periodic_tasks() -> {name: {"every": s, "run": fn, "pool": q}}   work for celery beat (rekku_workers.periodic)
    #   prunable() -> [PrunableLog]           a log table of the plugin's the pruner may thin (rekku.retention)
    #   get_static_injection(message=None, context_memory=None) -> dict  prompt context

    def unavailable_reason(self) -> str | None:
        """Why this plugin's actions cannot run here (e.g. a missing credential), or None."""
        return None


class TablePlugin(AIPluginBase):
    """A plugin whose actions are a table, so schema and instructions are written once:
    ``ACTIONS = {type: (description, required_fields, optional_fields)}``; ``FIELD_TYPES`` gives a
    field's JSON type for the instructions (default "string"); ``INSTRUCTION_NOTE`` is appended to
    every description; ``FIELD_ALIASES`` (``{older name: current name}``) are the ``aliases`` of every
    action that has the current field."""

    ACTIONS: dict[str, tuple[str, list[str], list[str]]] = {}
    FIELD_TYPES: dict[str, str] = {}
    INSTRUCTION_NOTE: str = ""
    FIELD_ALIASES: dict[str, str] = {}

    @classmethod
    def get_supported_action_types(cls) -> list[str]:
        return list(cls.ACTIONS)

    def get_supported_actions(self) -> dict:
        out = {}
        for t, (d, r, o) in self.ACTIONS.items():
            aliases = {old: new for old, new in self.FIELD_ALIASES.items() if new in (*r, *o)}
            out[t] = {"description": d, "required_fields": list(r), "optional_fields": list(o),
                      **({"aliases": aliases} if aliases else {})}
        return out

    def get_prompt_instructions(self, action_name: str) -> dict:
        if action_name not in self.ACTIONS:
            return {}
        description, required, optional = self.ACTIONS[action_name]
        return {"description": description + "." + self.INSTRUCTION_NOTE,
                "payload": {f: {"type": self.FIELD_TYPES.get(f, "string"), "required": f in required}
                            for f in [*required, *optional]}}


@dataclass(frozen=True)
class ActionSpec:
    """Everything the system knows about one action type, resolved once at registration."""

    type: str
    plugin: str
    description: str = ""
    required_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
    instructions: dict = field(default_factory=dict)
    pool: str = "default"
    time_limit: float | None = None
    rate_limit: str | None = None
    max_retries: int = 3
    idempotent: bool = False
    restricted: bool = False
    trainer_only: bool = False
    disabled: str | None = None
    #: Older names of payload fields, each with the current name it stands for (the original Rekku's
    #: ``message_thread_id`` for ``thread_id``): validation renames them, so handlers, authorization and
    #: the action log see only the current names (rekku.validation).
    aliases: tuple[tuple[str, str], ...] = ()
    #: Fields the action may carry on the action object itself, with no ``payload`` (the original's
    #: legacy form of ``bio_update``); validation moves them into the payload.
    fields_on_action: tuple[str, ...] = ()

    @property
    def task_name(self) -> str:
        return f"rekku.action.{self.type}"

    def capability(self) -> dict:
        """The public description of the action (GET /v1/capabilities)."""
        return {
            "description": self.description,
            "required_fields": list(self.required_fields),
            "optional_fields": list(self.optional_fields),
            "instructions": self.instructions,
            "queue": self.pool,
            **({"restricted": True} if self.restricted or self.trainer_only else {}),
        }


_OPTION_KEYS = ("pool", "time_limit", "rate_limit", "max_retries", "idempotent", "restricted", "trainer_only")


def build_spec(plugin_name: str, plugin: Any, action_type: str, schema: dict) -> ActionSpec:
    """Resolve an action's schema plus the plugin's class options into an ActionSpec."""
    options = {key: schema.get(key, getattr(plugin, key, getattr(AIPluginBase, key))) for key in _OPTION_KEYS}
    if options["pool"] not in POOLS:
        raise ValueError(f"action '{action_type}' asks for unknown pool '{options['pool']}' (pools: {POOLS})")
    try:
        instructions = plugin.get_prompt_instructions(action_type) or {}
    except Exception as exc:  # a plugin bug in its docs must not hide its actions
        instructions = {"error": f"get_prompt_instructions failed: {exc}"}
    reason = None
    if hasattr(plugin, "unavailable_reason"):
        reason = plugin.unavailable_reason()
    return ActionSpec(
        type=action_type,
        plugin=plugin_name,
        description=str(schema.get("description", "")),
        required_fields=tuple(schema.get("required_fields", ()) or ()),
        optional_fields=tuple(schema.get("optional_fields", ()) or ()),
        instructions=instructions,
        disabled=reason,
        aliases=_aliases(action_type, schema.get("aliases")),
        fields_on_action=tuple(str(f) for f in schema.get("fields_on_action", ()) or ()),
        **options,
    )


def _aliases(action_type: str, declared: Any) -> tuple[tuple[str, str], ...]:
    """A schema's ``aliases`` (``{old name: current name}``) as pairs, checked once at registration."""
    if not declared:
        return ()
    if not isinstance(declared, dict) or not all(isinstance(k, str) and isinstance(v, str) and k != v
                                                 for k, v in declared.items()):
        raise ValueError(f"action '{action_type}' declares 'aliases' that are not {{old name: current name}}")
    return tuple(declared.items())
