"""Accept a request of actions: parse → validate → write to the action log → enqueue.

Shared by ``POST /v1/actions`` and the ``rekku.ingest`` Celery task, so both answer the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any

from rekku import dispatch, feed
from rekku.action_log import ActionLog, EarlierBatch, NewRun, shared_log
from rekku.broker import broker_client
from rekku.broker_url import is_redis_url
from rekku.context import normalize_context
from rekku.corrections import CorrectionCounter, build_correction
from rekku.errors import Conflict, ServiceUnavailable, TooLarge, TooManyActions, ValidationError
from rekku.limits import (
    MAX_PAYLOAD_DEPTH,
    context_errors,
    depth_exceeds,
    is_valid_text,
    over_limit,
    printable,
    printable_value,
)
from rekku.metrics import count_submission
from rekku.parsing import ParseResult, parse_text, parse_value
from rekku.plugin_base import ActionSpec
from rekku.registry import Registry, get_registry
from rekku.settings import Settings, get_settings
from rekku.validation import Rejection, validate_actions

log = logging.getLogger(__name__)

#: Idempotency-key prefixes of Rekku's own requests (event deliveries, query outputs, speech sends,
#: ``rekku.ingest`` defaults); a client may not claim them first and so block or answer ours.
RESERVED_KEY_PREFIXES = ("event:", "output:", "speech:", "speech-credits:", "celery-task:", "signed:", "rekku:")
#: Longest idempotency key, in characters (the column's size).
MAX_KEY_CHARS = 255
#: Deepest reply echoed as JSON in a correction's ``your_reply`` (it sits 3 levels down in the stored
#: answer, and MariaDB stores JSON 32 levels deep); a deeper one is echoed as its JSON text.
ECHO_DEPTH = MAX_PAYLOAD_DEPTH - 4
#: Stands in for a reply too deep to echo back in a correction.
_TOO_DEEP_REPLY = f"(not repeated: nested deeper than {MAX_PAYLOAD_DEPTH} levels)"


@dataclass
class Answer:
    """What a submitter gets back; ``status`` is the HTTP status (202 or 422)."""

    batch_id: str | None
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    correction: dict | None = None
    status: int = 202

    def as_dict(self) -> dict:
        return {"batch_id": self.batch_id, "accepted": self.accepted, "rejected": self.rejected,
                "correction": self.correction}

    @classmethod
    def from_dict(cls, data: dict) -> Answer:
        return cls(data.get("batch_id"), data.get("accepted", []), data.get("rejected", []),
                   data.get("correction"), 202 if data.get("accepted") else 422)


def capabilities(registry: Registry) -> dict:
    return {t: spec.capability() for t, spec in sorted(registry.actions.items())}


class Ingress:
    """The ingress's work, independent of transport (HTTP or Celery)."""

    def __init__(self, settings: Settings, registry: Registry, action_log: ActionLog,
                 redis_client: Any | None = None, publisher: Any | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.log = action_log
        #: What publishes the messages (a Celery app; default the process's, rekku.celery_app.app).
        self.publisher = publisher
        self.corrections = CorrectionCounter(redis_client) if redis_client is not None else None

    def submit(self, body: Any, context: dict | None = None, idempotency_key: str | None = None) -> Answer:
        """Accept a request made inside Rekku (event deliveries, speech sends): its key is ours, and a
        key seen before answers what it answered then, whatever the body (a re-run may word it anew)."""
        answer = self._submit(body, context, idempotency_key, client=False)
        count_submission(answer.accepted, answer.rejected, self.registry)
        return answer

    def submit_from_client(self, body: Any, context: dict | None = None,
                           idempotency_key: str | None = None) -> Answer:
        """Accept a request from outside (HTTP, ``rekku.ingest``): the key may not take a prefix Rekku
        keeps for itself, and a key used before with another request is a 409, not the old answer."""
        if idempotency_key and _folded(idempotency_key).startswith(RESERVED_KEY_PREFIXES):
            raise ValidationError(f"idempotency keys starting with {', '.join(RESERVED_KEY_PREFIXES)} are "
                                  "reserved for Rekku's own requests; choose another key")
        if idempotency_key and (len(idempotency_key) > MAX_KEY_CHARS or not is_valid_text(idempotency_key)):
            raise ValidationError(f"the idempotency key must be UTF-8 text of at most {MAX_KEY_CHARS} characters")
        answer = self._submit(body, context, idempotency_key, client=True)
        count_submission(answer.accepted, answer.rejected, self.registry)
        return answer

    def _submit(self, body: Any, context: dict | None, idempotency_key: str | None, *, client: bool) -> Answer:
        """The one path that creates actions (callers: submit, submit_from_client)."""
        limit = self.settings.max_body_bytes  # HTTP bodies are cut at it; rekku.ingest messages are not
        text = isinstance(body, (str, bytes))
        bound = ("size" if len(body) > limit else None) if text else over_limit(body, limit, MAX_PAYLOAD_DEPTH + 3)
        if bound == "size":
            raise TooLarge(f"the request is larger than {limit} bytes (REKKU_MAX_BODY_BYTES)")
        ctx = normalize_context(context)
        problems = context_errors(ctx)
        if problems:
            return Answer(None, [], [{"index": None, "type": None, "errors": problems}], None, status=422)
        if bound == "depth":
            problem = (f"The actions are nested too deeply (a payload may nest at most {MAX_PAYLOAD_DEPTH} "
                       "levels)")
            return Answer(None, [], [{"index": None, "type": None, "errors": [problem]}],
                          self._correction([Rejection(None, None, [problem])], _TOO_DEEP_REPLY, ctx), status=422)
        fingerprint = _fingerprint(body, ctx) if client and idempotency_key else None
        if idempotency_key:
            earlier = self.log.find_batch(idempotency_key)
            if earlier is not None:
                return self._again(idempotency_key, earlier, fingerprint)
        parsed = parse_text(body) if isinstance(body, (str, bytes)) else parse_value(body)
        if parsed.plain_text is not None:
            parsed = self._plain_reply(parsed, ctx)
        limit = self.settings.max_actions_per_request
        if len(parsed.actions) > limit:
            raise TooManyActions(f"{len(parsed.actions)} actions in one request; at most {limit} "
                                 "(REKKU_MAX_ACTIONS_PER_REQUEST): split them over several requests")
        refusal = self.refusal(ctx)
        if refusal:
            return Answer(None, [], [{"index": None, "type": None, "errors": [refusal]}], None, status=403)
        self.observe(ctx)
        accepted, rejected = validate_actions(parsed.actions, self.registry, ctx, self.settings)
        rejected = [Rejection(None, None, parsed.errors)] + rejected if parsed.errors else rejected
        if not parsed.actions and not parsed.errors:
            if parsed.ignored_system_message:
                rejected = [Rejection(None, None, ["A system_message is never executed; no actions to run"])]
            else:  # {"actions": []} (or []): the prompt's way to stay silent, a valid reply with nothing to do
                if self.corrections is not None:
                    self.corrections.reset(ctx)
                return Answer(None, [], [], None, status=202)
        correction = self._correction(rejected, body, ctx, idempotency_key)
        if not accepted:
            return Answer(None, [], [r.as_dict() for r in rejected], correction, status=422)

        batch_id = str(uuid.uuid4())
        runs = [NewRun(str(uuid.uuid4()), a.index, a.spec.type, self.queue_for(a.spec, a.payload, ctx), a.payload,
                       {**ctx, **({"interface_hint": a.interface_hint} if a.interface_hint else {})})
                for a in accepted]
        answer = Answer(batch_id,
                        [{"index": r.position, "id": r.id, "type": r.type, "queue": r.queue} for r in runs],
                        [r.as_dict() for r in rejected], correction)
        earlier = self.log.record_batch(batch_id, idempotency_key, runs, answer.as_dict(), fingerprint)
        if earlier is not None:  # lost a race on the same idempotency key
            key = idempotency_key or ""
            return self._again(key, self.log.find_batch(key) or EarlierBatch(earlier, None), fingerprint)
        unsent = dispatch.enqueue(runs, batch_id, self.publisher)
        if unsent:
            self.log.fail_unsent(unsent, "could not enqueue: the broker is unreachable")
            if idempotency_key:
                self.log.forget_idempotency_key(batch_id)
            raise ServiceUnavailable(f"the broker is unreachable; {len(unsent)} of {len(runs)} actions "
                                     f"were not enqueued (marked failed in batch {batch_id})")
        return answer

    def _plain_reply(self, parsed: ParseResult, ctx: dict) -> ParseResult:
        """A reply with no JSON at all, as the original Rekku took it: a message to the chat the request
        came from (its interface, else REKKU_DEFAULT_INTERFACE; its thread), validated like any action.
        With REKKU_PLAIN_REPLY_AS_MESSAGE off, or no chat in the context, the parse errors stand."""
        if not self.settings.plain_reply_as_message or not ctx.get("chat_id") or parsed.plain_text is None:
            return parsed
        interface = ctx.get("interface") or self.settings.default_interface
        return ParseResult(actions=[{"type": f"message_{interface}", "payload": {"text": parsed.plain_text}}])

    def refusal(self, ctx: dict) -> str | None:
        """The first plugin's reason to refuse the whole request (trainers are never refused)."""
        if self.settings.is_trainer(ctx.get("interface"), ctx.get("user_id")):
            return None
        for name, plugin in self.registry.plugins.items():
            check = getattr(plugin, "check_request", None)
            if check is None:
                continue
            try:
                reason = check(ctx)
            except Exception:
                log.exception("check_request of plugin %s failed; not refusing on its account", name)
                continue
            if reason:
                return reason
        return None

    def observe(self, ctx: dict) -> None:
        for name, plugin in self.registry.plugins.items():
            observe = getattr(plugin, "on_request", None)
            if observe is not None:
                try:
                    observe(ctx)
                except Exception:
                    log.exception("on_request of plugin %s failed", name)

    def queue_for(self, spec: ActionSpec, payload: dict, ctx: dict) -> str:
        """The pool's queue, unless the plugin routes this action elsewhere (a node's own queue); the
        reconciler asks again for an action stranded in a dead node's queue."""
        route = getattr(self.registry.plugins[spec.plugin], "route_action", None)
        if route is None:
            return spec.pool
        try:
            return route(spec.type, payload, ctx) or spec.pool
        except Exception:
            log.exception("route_action of %s failed; using the pool queue", spec.type)
            return spec.pool

    @staticmethod
    def _again(key: str, earlier: EarlierBatch, fingerprint: str | None) -> Answer:
        """The answer a reused key gets: the first one, unless the request differs (a batch recorded
        before fingerprints were kept has none, and matches)."""
        if fingerprint and earlier.fingerprint and earlier.fingerprint != fingerprint:
            raise Conflict(f"the idempotency key {printable(key)!r} was already used for a different request "
                           f"(batch {earlier.response.get('batch_id')}); use a new key for new work, or the "
                           "same body and context to get the first answer again")
        return Answer.from_dict(earlier.response)

    def _correction(self, rejected: list[Rejection], body: Any, ctx: dict,
                    idempotency_key: str | None = None) -> dict | None:
        if not rejected:
            if self.corrections is not None:
                self.corrections.reset(ctx)
            return None
        errors = [f"action {r.index} ({r.type}): {e}" if r.index is not None else e
                  for r in rejected for e in r.errors]
        attempt = self.corrections.bump(ctx) if self.corrections is not None else 1
        original = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        if not isinstance(original, str) and depth_exceeds(original, ECHO_DEPTH):
            original = json.dumps(original, ensure_ascii=True)  # stored with the answer, within MariaDB's depth
        original = printable_value(original)  # stored with the answer: MariaDB's JSON refuses \ud800
        correction = build_correction(errors, original, capabilities(self.registry), attempt=attempt,
                                      retries=self.settings.corrector_retries)
        if correction is not None and ctx.get("chat_id"):
            # the model of that chat hears it on its feed too (the caller has it in the answer)
            # the model loop's own requests mark theirs: it sends them back to the model itself, in the
            # same turn (rekku/model_loop.py), and a redelivered turn adds no second item
            feed.append_now([feed.NewItem.about(feed.CORRECTION, ctx, correction,
                                                dedupe_key=_correction_key(idempotency_key))],
                            self.log.engine)
        return correction


@functools.lru_cache(maxsize=1)
def default_ingress() -> Ingress:
    """The process's ingress on the configured registry, database and broker."""
    settings = get_settings()
    client = broker_client(settings, timeout=2) if is_redis_url(settings.resolved_broker_url()) else None
    return Ingress(settings, get_registry(), shared_log(), client)


def _correction_key(idempotency_key: str | None) -> str | None:
    """The feed dedupe key of the correction of one of the model loop's own requests (their keys are
    ``rekku:turn:...``, short, and reserved: no client can take them): ``correction:<key>``. Other
    corrections carry none, as before."""
    if idempotency_key and idempotency_key.startswith("rekku:turn:") and len(idempotency_key) <= 170:
        return f"correction:{idempotency_key}"
    return None


def _folded(key: str) -> str:
    """``key`` as MariaDB's accent- and case-insensitive collation compares it, so ``EVENT:`` or ``évent:``
    cannot pass for a client's key and then match one of ours."""
    decomposed = unicodedata.normalize("NFKD", key[:32])
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _fingerprint(body: Any, context: dict[str, str]) -> str:
    """What makes two requests the same for an idempotency key: the body and the (normalized) context,
    as canonical JSON; only for a body within the bounds (it is encoded whole)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    canonical = json.dumps({"body": text, "context": context}, sort_keys=True, ensure_ascii=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
