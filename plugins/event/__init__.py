"""event: reminders and scheduled actions, delivered by celery beat through any interface (docs/plugins.md §2).

``event`` keeps upstream's payload (``date`` YYYY-MM-DD, ``time`` HH:MM, ``description`` ≤500,
``repeat``, ``created_by``) and adds: ``time`` with seconds, ``datetime`` (ISO 8601, with an offset
or local to the zone), ``in`` ("in 10 minutes"), ``timezone`` (IANA, default ``TZ``), ``repeat``
``yearly`` / ``every N minutes|hours`` / ``cron``, ``until``, ``count``, a delivery ``target``
{interface, chat_id, thread_id} (default: the chat the request came from) and ``actions`` to run
when it is due. Past times are refused. The time math is :mod:`rekku.schedule` (pure), delivery is
:mod:`.engine` (its tables, beat → dispatcher → one delivery per occurrence, exactly once).

Upstream's bugs fixed: delivery is not hard-wired to Telegram; an occurrence is marked delivered
only when it was; recurrences keep local wall-clock time (no UTC drift); ``always`` (which re-fired
every tick) is refused with a pointer to ``every``; monthly keeps the day of month.

Another chat's events are a trainer's business only: for anyone else ``list_events`` lists the
requesting chat's events, and ``cancel_event`` cancels an event aimed at the requesting chat or one
the same user asked for (upstream, and this project before, let any user list any chat's events,
with their scheduled actions, and cancel any event by its id).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from rekku.plugin import (
    PluginError,
    PrunableLog,
    Rejection,
    Rule,
    ScheduleError,
    TablePlugin,
    build_rule,
    current_action,
    get_interfaces,
    get_registry,
    get_settings,
    register_plugin,
    send_output,
    session_factory,
    upcoming,
    utcnow,
    validate_one,
)

from .engine import ACTIVE as EVENT_ACTIVE
from .engine import CANCELLED as EVENT_CANCELLED
from .engine import CANCELLED_DELIVERY as EVENT_DELIVERY_CANCELLED
from .engine import DELIVERED as EVENT_DELIVERED
from .engine import DONE as EVENT_DONE
from .engine import FAILED as EVENT_DELIVERY_FAILED
from .engine import MAX_ATTEMPTS as EVENT_MAX_ATTEMPTS
from .engine import PENDING as EVENT_DELIVERY_PENDING
from .engine import deliveries as event_deliveries
from .engine import events as scheduled_events
from .engine import new_event, requester_of
from .engine import tick as event_tick
from .settings import EventSettings

_WHEN = ["date", "time", "datetime", "in", "timezone", "repeat", "every", "cron", "until", "count"]

ACTIONS = {
    "event": ("Schedule a reminder (optionally recurring, optionally running actions when due). Say when with "
              "'date' (YYYY-MM-DD) + 'time' (HH:MM or HH:MM:SS, default 00:00), or 'datetime' (ISO 8601, e.g. "
              "2026-12-24T09:00:00+01:00), or 'in' (e.g. 'in 10 minutes'); times are local to 'timezone' (IANA, "
              "default the configured TZ). 'repeat': none, daily, weekly, monthly, yearly, 'every 15 minutes', "
              "'every 2 hours', or cron with 'cron' ('0 9 * * 1-5'); end a series with 'until' or 'count'. "
              "'target' {interface, chat_id, thread_id} defaults to this chat; 'actions' is a list of "
              "{type, payload} run when due, as the person who asked for this event and from this chat "
              "(checked now and again when due: only actions they may run themselves; no 'event' inside "
              "'actions'). 'created_by' is only a label: it never changes who the actions run as",
              ["description"], ["created_by", "target", "actions", *_WHEN]),
    "list_events": ("List scheduled events (default: those of this chat still waiting; another chat's only for "
                    "trainers)", [],
                    ["interface", "chat_id", "include_finished", "limit"]),
    "cancel_event": ("Cancel a scheduled event by its id", ["id"], []),
}

#: Longest description, as upstream.
MAX_DESCRIPTION = 500


class EventPlugin(TablePlugin):
    ACTIONS = ACTIONS
    FIELD_TYPES = {"target": "object", "actions": "array", "count": "integer", "include_finished": "boolean",
                   "limit": "integer", "id": "integer"}
    idempotent = True  # a re-run finds the event its first run created (by action id)
    settings_class = EventSettings

    def __init__(self) -> None:
        register_plugin("event", self)

    # ------------------------------------------------------------------ beat
    def periodic_tasks(self) -> dict:
        return {"tick": {"every": EventSettings.get().tick_seconds, "run": event_tick, "pool": "default"}}

    def prunable(self) -> list[PrunableLog]:
        """Finished deliveries are a log of reminders sent (the pruner thins it, rekku/retention.py); the
        events themselves, and deliveries still to be made or retried, are the user's and stay."""
        d = event_deliveries
        done = sa.or_(d.c.status.in_((EVENT_DELIVERED, EVENT_DELIVERY_CANCELLED)),
                      sa.and_(d.c.status == EVENT_DELIVERY_FAILED, d.c.attempts >= EVENT_MAX_ATTEMPTS))
        return [PrunableLog("event_deliveries", d, "updated_at", EventSettings.get().retain_deliveries_days,
                            final=done)]

    # ------------------------------------------------------------------ validation
    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if action_type == "cancel_event":
            value = payload.get("id")
            if isinstance(value, bool) or not str(value).strip().isdigit():
                return ["Field 'id' must be an event id (an integer) for action 'cancel_event'"]
            return []
        if action_type == "list_events":
            limit = payload.get("limit")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 500):
                return ["Field 'limit' must be an integer from 1 to 500 for action 'list_events'"]
            return []
        errors = []
        description = payload.get("description")
        if not isinstance(description, str):
            errors.append("Field 'description' must be a string for action 'event'")
        elif len(description) > MAX_DESCRIPTION:
            errors.append(f"Field 'description' must be at most {MAX_DESCRIPTION} characters for action 'event'")
        target = payload.get("target")
        if target is not None and not (isinstance(target, dict) and target.get("chat_id") not in (None, "")):
            errors.append("Field 'target' must be an object {interface, chat_id, thread_id} with a chat_id "
                          "for action 'event'")
        errors.extend(_actions_shape_errors(payload.get("actions")))
        try:
            build_rule(payload, utcnow(), get_settings().tz)
        except ScheduleError as exc:
            errors.append(f"{exc} (action 'event')")
        return errors

    # ------------------------------------------------------------------ authorization
    def authorize_payload(self, action_type: str, payload: dict, context: dict, is_trainer: bool) -> str | None:
        """The scheduled actions are authorized NOW, for the requester, as if they asked for them now:
        each goes through the ingress's own validation (schema, its plugin's checks, trainer-only,
        restrictions, its plugin's ``authorize_payload``) with this request's context. Otherwise an
        event would launder any action past the ingress (a non-trainer's ``terminal`` run when due).
        ``list_events`` and ``cancel_event`` reach only the requesting chat's events for a
        non-trainer (see :func:`_others_refusal`; ``cancel_event``'s event is checked when it runs).
        Called at the ingress and again in the worker (``AuthorizationHook``)."""
        if action_type in ("list_events", "cancel_event") and not is_trainer:
            return _others_refusal(action_type, payload, context or {})
        if action_type == "event" and payload.get("target") is None and (context or {}).get("chat_id") in (None, ""):
            return ("The event has no 'target' and the request came from no chat; give target "
                    "{interface, chat_id} for action 'event'")
        if action_type != "event" or not isinstance(payload.get("actions"), list):
            return None
        return scheduled_actions_refusal(payload["actions"], requester_of(context))

    # ------------------------------------------------------------------ handlers
    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        if action_type == "event":
            return self._create(payload)
        if action_type == "cancel_event":
            return self._cancel(int(str(payload["id"]).strip()))
        return self._list(payload)

    def _create(self, payload: dict) -> dict:
        ctx = current_action()
        settings = get_settings()
        try:
            rule, first = build_rule(payload, utcnow(), settings.tz)
        except ScheduleError as exc:
            raise PluginError(str(exc)) from None
        target = payload.get("target") or {}
        interface = str(target.get("interface") or (ctx.interface if ctx and ctx.interface else "")
                        or settings.default_interface)
        chat_id = target.get("chat_id") or (ctx.chat_id if ctx else None)
        thread_id = target.get("thread_id") if target else (ctx.thread_id if ctx else None)
        if chat_id in (None, ""):
            raise PluginError("The event has no 'target' and the request came from no chat; give "
                              "target {interface, chat_id}")
        interfaces = get_interfaces()
        if interfaces.get(interface) is None:
            reason = interfaces.disabled.get(interface, "no such interface")
            raise PluginError(f"Interface '{interface}' is unavailable: {reason}")
        action_id = ctx.action_id if ctx else None
        sessions = session_factory()
        if action_id:
            with sessions() as s:
                earlier = s.execute(sa.select(scheduled_events)
                                    .where(scheduled_events.c.action_id == action_id)).one_or_none()
            if earlier is not None:
                return _describe(earlier)
        # created_by is the model's label (upstream's field); who the actions run as is the verified
        # requester, recorded here from the request context and never from the payload
        created_by = payload.get("created_by") or (ctx.user_id or ctx.username if ctx else None)
        row = new_event(rule, first, payload["description"], interface, str(chat_id), thread_id,
                        created_by=str(created_by) if created_by else None, actions=payload.get("actions"),
                        action_id=action_id, requester=requester_of(ctx) if ctx is not None else None)
        with sessions.begin() as s:
            event_id = s.execute(sa.insert(scheduled_events).values(**row)).inserted_primary_key[0]
        return _describe({**row, "id": event_id})

    def _cancel(self, event_id: int) -> dict:
        now = utcnow()
        with session_factory().begin() as s:
            row = s.execute(sa.select(scheduled_events.c.interface, scheduled_events.c.chat_id,
                                      scheduled_events.c.requester)
                            .where(scheduled_events.c.id == event_id)).one_or_none()
            if row is None:
                raise PluginError(f"No event with id {event_id}")
            if not _may_touch(row):
                raise PluginError(f"Event {event_id} is another chat's: only a trainer may cancel an event "
                                  "that is neither aimed at this chat nor asked for by this user")
            # an occurrence claimed ahead of its due time (the dispatcher's look-ahead) is still cancellable
            ahead = s.execute(sa.update(event_deliveries)
                              .where(event_deliveries.c.event_id == event_id,
                                     event_deliveries.c.status == EVENT_DELIVERY_PENDING,
                                     event_deliveries.c.occurrence > now)
                              .values(status=EVENT_DELIVERY_CANCELLED, updated_at=now)).rowcount
            states = [EVENT_ACTIVE, EVENT_DONE] if ahead else [EVENT_ACTIVE]
            done = s.execute(sa.update(scheduled_events)
                             .where(scheduled_events.c.id == event_id, scheduled_events.c.status.in_(states))
                             .values(status=EVENT_CANCELLED, updated_at=now)).rowcount
            status = s.scalar(sa.select(scheduled_events.c.status).where(scheduled_events.c.id == event_id))
        return {"id": event_id, "cancelled": bool(done), "status": status}

    def _list(self, payload: dict) -> dict:
        ctx = current_action()
        # a one-off event whose occurrence the dispatcher claimed ahead of its due time is 'done' in the
        # table but still waiting for the user: it is listed as active until it is due
        waiting = sa.exists().where(event_deliveries.c.event_id == scheduled_events.c.id,
                                    event_deliveries.c.status == EVENT_DELIVERY_PENDING,
                                    event_deliveries.c.occurrence > utcnow())
        claimed_ahead = sa.and_(scheduled_events.c.status == EVENT_DONE, waiting)
        query = (sa.select(scheduled_events, sa.case((claimed_ahead, True), else_=False).label("claimed_ahead"))
                 .order_by(scheduled_events.c.next_run, scheduled_events.c.id).limit(int(payload.get("limit", 50))))
        chat_id = payload.get("chat_id") or (ctx.chat_id if ctx else None)
        if chat_id:
            query = query.where(scheduled_events.c.chat_id == str(chat_id))
        interface = payload.get("interface")
        named = payload.get("chat_id")
        if not interface and ctx is not None and ctx.chat_id and (not named or str(named) == str(ctx.chat_id)):
            # this chat, named or not: only a chat of another interface is not this one (a trainer may
            # name another chat without its interface, and gets that id's chats of every interface)
            interface = _own_interface(ctx.interface)
        if interface:  # this chat's events are those of its interface too: Discord's 123 is not Telegram's
            query = query.where(scheduled_events.c.interface == str(interface))
        if not payload.get("include_finished"):
            query = query.where(sa.or_(scheduled_events.c.status == EVENT_ACTIVE, claimed_ahead))
        with session_factory()() as s:
            rows = s.execute(query).all()
        result = {"events": [_describe(r) for r in rows]}
        send_output(result, f"{len(rows)} events")
        return result


def _own_interface(interface: Any) -> str:
    """The requesting chat's ``interface`` as ``event`` stores it (the default one when unnamed)."""
    return str(interface or get_settings().default_interface)


def _others_refusal(action_type: str, payload: dict, context: dict) -> str | None:
    """Why a non-trainer may not run ``list_events``/``cancel_event`` so, or None: from no chat they
    would reach every chat's events; ``list_events`` may name only the requesting chat."""
    chat_id = context.get("chat_id")
    if chat_id in (None, ""):
        return (f"Action '{action_type}' is restricted to trainers when the request comes from no chat: "
                "others may only see and cancel the events of the chat they write from")
    if action_type == "list_events":
        own_interface = _own_interface(context.get("interface"))
        named_chat, named_interface = payload.get("chat_id"), payload.get("interface")
        if (named_chat not in (None, "") and str(named_chat) != str(chat_id)) or \
                (named_interface not in (None, "") and str(named_interface) != own_interface):
            return ("Only a trainer may list another chat's events: leave out 'chat_id' and 'interface' "
                    "for action 'list_events' to list this chat's")
    return None


def _may_touch(row: Any) -> bool:
    """Whether the running action's requester may cancel the event ``row``: a trainer always; anyone
    else if it is aimed at the chat they write from, or they asked for it (the verified requester)."""
    ctx = current_action()
    if ctx is None:  # not an action: Rekku's own code calling the plugin, with no requester to hold to
        return True
    if get_settings().is_trainer(ctx.interface, ctx.user_id):
        return True
    own_chat = (_own_interface(ctx.interface), str(ctx.chat_id))
    if ctx.chat_id not in (None, "") and (row.interface, row.chat_id) == own_chat:
        return True
    asked_by = row.requester or {}
    return (ctx.user_id not in (None, "") and str(asked_by.get("user_id") or "") == str(ctx.user_id)
            and str(asked_by.get("interface") or "") == str(ctx.interface or ""))


def _describe(row: Any) -> dict:
    """An event as actions return it: local and UTC times of the next occurrence, and the next few."""
    data = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
    if data.pop("claimed_ahead", False):
        data["status"] = EVENT_ACTIVE  # its occurrence is claimed but not due yet (see _list)
    rule = Rule.from_dict(data["rule"])
    next_run = data.get("next_run")
    out = {"id": data["id"], "description": data["description"], "status": data["status"],
           "repeat": data["recurrence_type"], "timezone": data["timezone"],
           "target": {"interface": data["interface"], "chat_id": data["chat_id"],
                      "thread_id": data["thread_id"] or None},
           "created_by": data["created_by"], "actions": data["actions"] or []}
    if data.get("requester"):  # who the scheduled actions run as (verified), next to the model's label
        out["requested_by"] = {k: v for k, v in data["requester"].items()
                               if k in ("interface", "user_id", "username")}
    if next_run is not None and data["status"] == EVENT_ACTIVE:
        out["next_run"] = next_run.isoformat()
        out["next_run_local"] = next_run.astimezone(rule.zone).isoformat()
        out["upcoming_local"] = [t.astimezone(rule.zone).isoformat()
                                 for t in upcoming(rule, data["next_run"], 3, data["occurrence_index"])]
    for key in ("every", "cron", "until", "count"):
        if getattr(rule, key) is not None:
            out[key] = getattr(rule, key)
    return out


def _actions_shape_errors(actions: Any) -> list[str]:
    """What is wrong with the shape of an event's ``actions``, without any context: a list of
    {type, payload} objects of known types, and no ``event`` among them (see :data:`NESTED_REFUSED`)."""
    if actions is None:
        return []
    if not isinstance(actions, list) or not all(
            isinstance(a, dict) and isinstance(a.get("type"), str) and isinstance(a.get("payload", {}), dict)
            for a in actions):
        return ["Field 'actions' must be a list of {type, payload} objects for action 'event'"]
    nested = sorted({a["type"] for a in actions} & NESTED_REFUSED)
    if nested:
        return [f"Field 'actions' cannot hold {nested} for action 'event': a scheduled action cannot schedule "
                "events; make it a separate 'event'"]
    unknown = sorted({a["type"] for a in actions} - set(get_registry().actions))
    if unknown:
        return [f"Field 'actions' names unsupported action types {unknown} for action 'event'"]
    return []


#: Action types an event's ``actions`` may not hold. An event inside an event would be validated now
#: against a time that is only meaningful when it is due, and its own actions would be checked one
#: level further each time; refusing it keeps the check one level deep (a recurrence covers the use).
NESTED_REFUSED = frozenset({"event"})


def scheduled_actions_refusal(actions: list, requester: dict[str, str]) -> str | None:
    """Why ``requester`` may not schedule ``actions``, or None: each one is validated exactly as the
    ingress would validate it in a request of theirs (rekku.validation.validate_one), so a trainer-only
    action in a non-trainer's event is refused with the usual wording, naming its place in 'actions'."""
    registry, settings = get_registry(), get_settings()
    problems = []
    for index, raw in enumerate(actions):
        if isinstance(raw, dict) and raw.get("type") in NESTED_REFUSED:
            problems.append(f"actions[{index}] ({raw['type']}): a scheduled action cannot schedule events")
            continue
        outcome = validate_one(index, raw, registry, requester, settings)
        if isinstance(outcome, Rejection):
            problems += [f"actions[{index}] ({outcome.type}): {error}" for error in outcome.errors]
    if not problems:
        return None
    return ("Field 'actions' of action 'event' holds actions this request may not schedule (they would run "
            "as the person asking, from this chat): " + "; ".join(problems))


PLUGIN_CLASS = EventPlugin
