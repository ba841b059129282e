"""Query results sent back to the chat that asked, as upstream's ``system_message`` of type ``output``.

The reply is an action of its own (``message_<interface>``, in the action log, with retries), made
through the ingress's one path for actions (rekku.ingest ``submit_follow_up``: validated, authorized,
routed to its plugin's pool, logged, published) under the idempotency key ``output:<action id>``: a
query re-run after a redelivery never sends its output twice, and the query itself never waits on a
platform.

The reply runs with the query's verified context (the chat and user the token holder named); it
names no ``target``, so the message goes to exactly the context's chat and is never resolved by name
(a chat id that is not a number could otherwise be matched against a chat name someone else stored).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from rekku import dispatch
from rekku.action_log import NewRun, shared_log
from rekku.context import current_action
from rekku.errors import ServiceUnavailable, TooLarge, TransientError
from rekku.ingest import default_ingress
from rekku.interfaces.registry import get_interfaces
from rekku.settings import get_settings

log = logging.getLogger(__name__)


def output_message(action_type: str, action_id: str, result: Any, message: str) -> str:
    return json.dumps({"system_message": {"type": "output", "action": action_type, "action_id": action_id,
                                          "message": message, "result": result}}, ensure_ascii=False, default=str)


def send_output(result: Any, message: str) -> str | None:
    """From inside a handler: send ``result`` to the chat the request came from, if any.

    Returns the reply action's id, or None when the request came from no chat (or from an
    interface that is not available here)."""
    ctx = current_action()
    if ctx is None or not ctx.chat_id:
        return None
    interface = ctx.interface or get_settings().default_interface
    if get_interfaces().get(interface) is None:
        log.info("output of %s not sent back: interface %s is unavailable", ctx.action_id, interface)
        return None
    key = f"output:{ctx.action_id}"
    earlier = shared_log().find_batch_response(key)
    if earlier is not None:
        return _again(earlier)
    # no "target": the message plugin then sends to the context's own chat and thread, never by name
    payload = {"text": output_message(ctx.action_type, ctx.action_id, result, message)}
    context = {k: v for k, v in {"interface": interface, "chat_id": ctx.chat_id, "thread_id": ctx.thread_id,
                                 "user_id": ctx.user_id, "username": ctx.username}.items() if v}
    try:
        answer = default_ingress().submit_follow_up([{"type": f"message_{interface}", "payload": payload}],
                                                    context, key, marks={"reply_to_action": ctx.action_id})
    except ServiceUnavailable as exc:  # its run was marked failed and the key released: the query retries
        raise TransientError(f"could not enqueue the output reply: {exc}") from exc
    except TooLarge as exc:
        log.warning("output of %s not sent back: %s", ctx.action_id, exc)
        return None
    if not answer.accepted:
        reasons = "; ".join(e for r in answer.rejected for e in r.get("errors", []))
        log.warning("output of %s not sent back: %s", ctx.action_id, reasons)
        return None
    return answer.accepted[0]["id"]


def _again(answer: dict) -> str:
    """The reply was recorded by an earlier run of this query, which may have died before enqueuing it:
    a reply still queued is enqueued again (a duplicate message is harmless: delivery sends each part once)."""
    reply_id = answer["accepted"][0]["id"]
    run = shared_log().get(reply_id)
    if run is not None and run["status"] == "queued" and run["attempts"] == 0:
        context = {k: v for k, v in run["context"].items() if k != "batch_id"}
        _enqueue(NewRun(reply_id, 0, run["type"], run["queue"], run["payload"], context), run["batch_id"])
    return reply_id


def _enqueue(run: NewRun, batch_id: str) -> None:
    if dispatch.enqueue([run], batch_id):
        raise TransientError("could not enqueue the output reply: the broker is unreachable")
