"""The correction a calling LLM service sends back to its model when actions were rejected.

``CORRECTOR_RETRIES`` bounds how many corrections in a row one chat gets within
:data:`WINDOW_SECONDS`; the count lives in Redis so every ingress process shares it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Window in which consecutive corrections of one chat are counted, in seconds.
WINDOW_SECONDS = 300

JSON_INSTRUCTIONS = (
    'Answer with JSON only: {"actions": [{"type": "<action type>", "payload": {...}}]}. '
    "Each action's payload must contain its required_fields; optional_fields may be added. "
    "Use only the action types listed in 'actions'."
)
RETRY_POLICY = (
    "Re-send the same JSON with only the invalid part fixed. Do not change or repeat the actions "
    "that were accepted; they already run."
)


def _key(context: dict) -> str | None:
    chat = context.get("chat_id")
    if not chat:
        return None
    return f"rekku:corrections:{context.get('interface', '')}:{chat}"


class CorrectionCounter:
    """Counts consecutive corrections per chat in Redis (fails open: no Redis, no limit)."""

    def __init__(self, redis_client: Any) -> None:
        self.redis = redis_client

    def bump(self, context: dict) -> int:
        key = _key(context)
        if key is None:
            return 1
        try:
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_SECONDS)
            return int(pipe.execute()[0])
        except Exception:
            log.warning("correction counter unavailable; not bounding corrections", exc_info=True)
            return 1

    def reset(self, context: dict) -> None:
        key = _key(context)
        if key is not None:
            try:
                self.redis.delete(key)
            except Exception:
                log.debug("could not reset correction counter", exc_info=True)


def build_correction(errors: list[str], original: Any, capabilities: dict, *, attempt: int,
                     retries: int) -> dict:
    """The ``correction`` object of docs/contracts.md §1."""
    if attempt > retries:
        message = (f"This chat sent {attempt} invalid replies in a row; it is blocked from further "
                   f"corrections for the next {WINDOW_SECONDS // 60} minutes. Do not retry now.")
        return {"system_message": {"type": "error", "message": message, "errors": errors,
                                   "blocked": True, "your_reply": original,
                                   "error_retry_policy": "Do not retry until the block expires."}}
    message = "Some actions in your reply were invalid and were not run: " + "; ".join(errors)
    return {"system_message": {
        "type": "error", "message": message, "errors": errors, "your_reply": original,
        "full_json_instructions": {"instructions": JSON_INSTRUCTIONS, "actions": capabilities},
        "error_retry_policy": f"{RETRY_POLICY} Attempt {attempt} of {retries}.",
    }}
