"""The durable action log: every accepted action is written here before it is enqueued.

State changes are single conditional UPDATEs, so two deliveries of the same task can never both
claim it after it finished, and a cancelled action is never started.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from rekku.db import get_engine
from rekku.models import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    ActionRun,
    Batch,
    chat_key,
    utcnow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Tries of one state change when the database drops the connection under it.
RECONNECT_ATTEMPTS = 3
#: Longest error text kept per action, in characters.
MAX_ERROR_CHARS = 8000


def lost_error(lost: int, limit: int) -> str:
    """The error of an action failed because its worker process kept dying while running it."""
    return (f"its worker process died {lost} times while running it (killed by the OS, out of memory, "
            f"or a crash); not retried: REKKU_MAX_ATTEMPTS={limit}")


def node_of_worker(worker: str | None) -> str | None:
    """The node a ``worker`` column names: ``pool@node#incarnation`` → ``pool@node`` (the incarnation
    tells one start of the node from the next; see rekku.reconciler)."""
    return worker.partition("#")[0] if worker else worker


class RunState(NamedTuple):
    """What a worker reads before running a delivery (one SELECT)."""

    status: str
    cancel_requested: bool
    #: Runs lost with their worker process so far (see ``ActionRun.lost_runs``).
    lost_runs: int
    #: Delivered to a worker before (running, retried, or recovered from a dead node): this delivery
    #: writes its claim before the handler runs, so a process that dies at once is still counted.
    delivered_before: bool


@dataclass
class NewRun:
    id: str
    position: int
    type: str
    queue: str
    payload: dict
    context: dict


@dataclass
class EarlierBatch:
    """What an idempotency key answered the first time, and a fingerprint of that request (None for
    batches recorded before fingerprints were kept, or by Rekku's own requests)."""

    response: dict
    fingerprint: str | None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_as_dict(run: Any) -> dict[str, Any]:
    """The public shape of an action (GET /v1/actions/{id}) from an ``action_runs`` row."""
    return {
        "id": run.id, "batch_id": run.batch_id, "type": run.type, "status": run.status,
        "queue": run.queue, "payload": run.payload, "context": run.context or {},
        "result": run.result, "error": run.error, "progress": run.progress,
        "attempts": run.attempts, "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
        "worker": node_of_worker(run.worker),
    }


def _json_safe(value: Any) -> Any:
    """Results must be JSON; anything else is kept as its repr rather than failing the action."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return {"repr": repr(value)[:MAX_ERROR_CHARS], "note": "result was not JSON-serialisable"}


_runs, _batches = ActionRun.__table__, Batch.__table__
_id = _runs.c.id == sa.bindparam("aid")

# The worker's per-action statements, built once: SQLAlchemy then reuses their compiled form,
# which matters on the hot path (building ORM statements per call cost more than the queries).
# ``status IN (...)`` with literal values: a tuple given to ``in_()`` becomes an "expanding" parameter
# that SQLAlchemy re-renders on every execution (a tenth of a quick action's worker time in py-spy).
_QUEUED_OR_RUNNING = _runs.c.status.in_([sa.literal_column(f"'{QUEUED}'"), sa.literal_column(f"'{RUNNING}'")])
_CLAIM = (sa.update(_runs)
          .where(_id, _QUEUED_OR_RUNNING, _runs.c.cancel_requested.is_(False))
          .values(status=RUNNING, attempts=_runs.c.attempts + 1, worker=sa.bindparam("worker"),
                  started_at=sa.bindparam("now"), updated_at=sa.bindparam("now")))
_FINISH_VALUES = dict(status=sa.bindparam("status"), result=sa.bindparam("result"), error=sa.bindparam("error"),
                      finished_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
#: running → final (the usual end), and queued/running → final (a cancel).
_FINISH = sa.update(_runs).where(_id, _runs.c.status == RUNNING).values(**_FINISH_VALUES)
_FINISH_UNFINISHED = sa.update(_runs).where(_id, _QUEUED_OR_RUNNING).values(**_FINISH_VALUES)
# A handler that finished before its claim was written: one write does claim and finish together.
_CLAIM_AND_FINISH = (sa.update(_runs)
                     .where(_id, _QUEUED_OR_RUNNING, _runs.c.cancel_requested.is_(False))
                     .values(status=sa.bindparam("status"), result=sa.bindparam("result"),
                             error=sa.bindparam("error"), attempts=_runs.c.attempts + 1,
                             worker=sa.bindparam("worker"), started_at=sa.bindparam("started"),
                             finished_at=sa.bindparam("now"), updated_at=sa.bindparam("now")))
_CLAIM_AND_FINISH_WITH_PROGRESS = _CLAIM_AND_FINISH.values(progress=sa.bindparam("progress"))
_REQUEUE = (sa.update(_runs).where(_id, _runs.c.status == RUNNING)
            .values(status=QUEUED, error=sa.bindparam("error"), updated_at=sa.bindparam("now")))
_PROGRESS = sa.update(_runs).where(_id).values(progress=sa.bindparam("progress"), updated_at=sa.bindparam("now"))
_GET = sa.select(_runs).where(_id)
_ATTEMPTS = sa.select(_runs.c.attempts).where(_id)
_CANCEL_REQUESTED = sa.select(_runs.c.cancel_requested).where(_id)
_STATE = sa.select(_runs.c.status, _runs.c.cancel_requested, _runs.c.lost_runs, _runs.c.worker).where(_id)
_UNFINISHED = _QUEUED_OR_RUNNING
# A run lost with its pool process, seen by the worker's main process: counted; one that died before its
# claim was written is counted as an attempt too, and marked as delivered (its redelivery claims first).
# The run goes back to queued at once (Celery puts its message back): a later recovery of the node must
# not count the same loss again, and the API must not say "running" while it waits. Only this worker's
# run is touched (another may have claimed it since). ordered_values: MariaDB evaluates SET left to
# right, so status changes last, after the CASEs have read the old one.
_LOST = (sa.update(_runs)
         .where(_id, _UNFINISHED, (_runs.c.status == QUEUED) | (_runs.c.worker == sa.bindparam("worker")))
         .ordered_values(
             (_runs.c.lost_runs, _runs.c.lost_runs + 1),
             (_runs.c.attempts, sa.case((_runs.c.status == QUEUED, _runs.c.attempts + 1), else_=_runs.c.attempts)),
             (_runs.c.worker, sa.bindparam("worker")),
             (_runs.c.updated_at, sa.bindparam("now")),
             (_runs.c.status, QUEUED)))
_LOST_RUNS = sa.select(_runs.c.lost_runs).where(_id, _UNFINISHED)
_FAIL_UNFINISHED = (sa.update(_runs).where(_id, _UNFINISHED)
                    .values(status=FAILED, error=sa.bindparam("error"), finished_at=sa.bindparam("now"),
                            updated_at=sa.bindparam("now")))


class ActionLog:
    """Reads and state transitions of ``action_runs`` and ``action_batches`` (SQLAlchemy Core)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self._engine = engine or get_engine()

    @property
    def engine(self) -> Engine:
        """The database this log writes to (the feed's items of a request go there too)."""
        return self._engine

    def _do(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``work`` in a transaction (or a read), again on a fresh connection when the database
        dropped the one it had (server restart, killed connection): the worker's state changes are
        conditional UPDATEs, safe to repeat, and an action must not be left behind by a hiccup."""
        for attempt in range(1, RECONNECT_ATTEMPTS + 1):
            try:
                with (self._engine.begin() if write else self._engine.connect()) as c:
                    return work(c)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt == RECONNECT_ATTEMPTS:
                    raise
                log.warning("database connection lost (%s); retrying on a new one", type(exc.orig).__name__)
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ ingress side
    def find_batch(self, idempotency_key: str) -> EarlierBatch | None:
        with self._engine.connect() as c:
            row = c.execute(sa.select(_batches.c.response, _batches.c.request_hash)
                            .where(_batches.c.idempotency_key == idempotency_key)).first()
        return EarlierBatch(row.response, row.request_hash) if row is not None else None

    def find_batch_response(self, idempotency_key: str) -> dict | None:
        earlier = self.find_batch(idempotency_key)
        return earlier.response if earlier is not None else None

    def record_batch(self, batch_id: str, idempotency_key: str | None, runs: list[NewRun],
                     response: dict, fingerprint: str | None = None) -> dict | None:
        """Write the batch and its runs in one transaction. Returns the earlier answer when the
        idempotency key was already used (then nothing is written)."""
        now = utcnow()
        try:
            with self._engine.begin() as c:
                c.execute(sa.insert(_batches), [{"id": batch_id, "idempotency_key": idempotency_key,
                                                 "response": response, "request_hash": fingerprint,
                                                 "created_at": now}])
                if runs:
                    c.execute(sa.insert(_runs), [
                        {"id": r.id, "batch_id": batch_id, "position": r.position, "type": r.type,
                         "queue": r.queue, "status": QUEUED, "payload": r.payload, "context": r.context,
                         "chat_id": chat_key((r.context or {}).get("chat_id")),
                         "attempts": 0, "cancel_requested": False, "created_at": now, "updated_at": now}
                        for r in runs])
        except IntegrityError:
            if idempotency_key is None:
                raise
            earlier = self.find_batch_response(idempotency_key)
            if earlier is None:
                raise
            return earlier
        return None

    def forget_idempotency_key(self, batch_id: str) -> None:
        """Let a client retry with the same key after we failed to enqueue its batch."""
        with self._engine.begin() as c:
            c.execute(sa.update(_batches).where(_batches.c.id == batch_id).values(idempotency_key=None))

    def fail_unsent(self, ids: list[str], error: str) -> None:
        with self._engine.begin() as c:
            c.execute(sa.update(_runs).where(_runs.c.id.in_(ids), _runs.c.status == QUEUED)
                      .values(status=FAILED, error=error, finished_at=utcnow(), updated_at=utcnow()))

    # ------------------------------------------------------------------ worker side
    def claim(self, action_id: str, worker: str) -> bool:
        """queued/running → running. False when the action is final (already done, cancelled) or unknown.

        ``running`` is claimable because a redelivered task means its previous holder died."""
        now = utcnow()
        return self._do(lambda c: c.execute(_CLAIM, {"aid": action_id, "worker": worker, "now": now}).rowcount == 1)

    def state(self, action_id: str) -> RunState | None:
        """What a delivery needs to know before it runs, or None for an unknown action: a read, no lock."""
        row = self._do(lambda c: c.execute(_STATE, {"aid": action_id}).first(), write=False)
        if row is None:
            return None
        return RunState(row.status, bool(row.cancel_requested), row.lost_runs or 0,
                        row.status == RUNNING or row.worker is not None)

    def record_lost(self, action_id: str, worker: str, limit: int) -> int:
        """A run of the action was lost with its worker process: count it; at ``limit`` lost runs the
        action fails (:func:`lost_error`). Returns the lost runs counted (0: the action is final)."""
        def work(c: Connection) -> int:
            now = utcnow()
            if not c.execute(_LOST, {"aid": action_id, "worker": worker, "now": now}).rowcount:
                return 0
            lost = c.scalar(_LOST_RUNS, {"aid": action_id}) or 0
            if lost >= limit:
                c.execute(_FAIL_UNFINISHED, {"aid": action_id, "error": lost_error(lost, limit), "now": now})
            return lost

        return self._do(work)

    def fail_unfinished(self, action_id: str, error: str) -> bool:
        """queued/running → failed (an action not to run again); False when it is already final."""
        params = {"aid": action_id, "error": error[:MAX_ERROR_CHARS], "now": utcnow()}
        return self._do(lambda c: c.execute(_FAIL_UNFINISHED, params).rowcount == 1)

    def attempts(self, action_id: str) -> int:
        return self._do(lambda c: c.scalar(_ATTEMPTS, {"aid": action_id}), write=False) or 0

    def succeed(self, action_id: str, result: Any) -> None:
        self._finish(action_id, SUCCEEDED, result=_json_safe(result))

    def fail(self, action_id: str, error: str) -> None:
        self._finish(action_id, FAILED, error=error[:MAX_ERROR_CHARS])

    def cancelled(self, action_id: str, reason: str = "cancelled") -> None:
        self._finish(action_id, CANCELLED, error=reason, statement=_FINISH_UNFINISHED)

    def _finish(self, action_id: str, status: str, *, result: Any = None, error: str | None = None,
                statement: sa.Update = _FINISH) -> None:
        params = {"aid": action_id, "status": status, "result": result, "error": error, "now": utcnow()}
        self._do(lambda c: c.execute(statement, params))

    def claim_and_finish(self, action_id: str, worker: str, started: datetime, *, succeeded: bool,
                         result: Any = None, error: str | None = None, progress: dict | None = None) -> None:
        """Record a whole run in one write (for runs that ended before their claim was written), with
        the last progress it reported (None keeps what the log has)."""
        params = {"aid": action_id, "worker": worker, "started": started, "now": utcnow(),
                  "status": SUCCEEDED if succeeded else FAILED,
                  "result": _json_safe(result) if succeeded else None,
                  "error": None if succeeded else (error or "")[:MAX_ERROR_CHARS]}
        statement = _CLAIM_AND_FINISH
        if progress is not None:
            statement, params["progress"] = _CLAIM_AND_FINISH_WITH_PROGRESS, _json_safe(progress)
        self._do(lambda c: c.execute(statement, params))

    def requeue(self, action_id: str, error: str) -> None:
        """running → queued, keeping the last error, before a retry is scheduled."""
        params = {"aid": action_id, "error": error[:MAX_ERROR_CHARS], "now": utcnow()}
        self._do(lambda c: c.execute(_REQUEUE, params))

    def set_progress(self, action_id: str, progress: dict) -> None:
        params = {"aid": action_id, "progress": _json_safe(progress), "now": utcnow()}
        self._do(lambda c: c.execute(_PROGRESS, params))

    # ------------------------------------------------------------------ reads and cancel
    def get(self, action_id: str) -> dict | None:
        with self._engine.connect() as c:
            row = c.execute(_GET, {"aid": action_id}).first()
            return run_as_dict(row) if row else None

    def batch(self, batch_id: str) -> list[dict] | None:
        with self._engine.connect() as c:
            rows = c.execute(sa.select(_runs).where(_runs.c.batch_id == batch_id).order_by(_runs.c.position)).all()
            if not rows and c.scalar(sa.select(_batches.c.id).where(_batches.c.id == batch_id)) is None:
                return None
            return [run_as_dict(r) for r in rows]

    def request_cancel(self, action_id: str) -> tuple[str | None, bool]:
        """Cancel a queued action at once; mark a running one so its worker stops it.

        Returns ``(status after the request, whether this request changed anything)``;
        the status is None when there is no such action."""
        now = utcnow()
        with self._engine.begin() as c:
            res = c.execute(sa.update(_runs).where(_runs.c.id == action_id, _runs.c.status == QUEUED)
                            .values(status=CANCELLED, cancel_requested=True, error="cancelled before it ran",
                                    finished_at=now, updated_at=now))
            if res.rowcount:
                return CANCELLED, True
            res = c.execute(sa.update(_runs).where(_runs.c.id == action_id, _runs.c.status == RUNNING)
                            .values(cancel_requested=True, updated_at=now))
            return c.scalar(sa.select(_runs.c.status).where(_runs.c.id == action_id)), bool(res.rowcount)

    def cancel_requested(self, action_id: str) -> bool:
        return bool(self._do(lambda c: c.scalar(_CANCEL_REQUESTED, {"aid": action_id}), write=False))

    def failed(self, limit: int = 100, before: str | None = None) -> list[dict]:
        """Dead letters: failed actions (retries exhausted or not retryable), newest first."""
        query = sa.select(_runs).where(_runs.c.status == FAILED)
        if before:
            query = query.where(_runs.c.finished_at < sa.select(_runs.c.finished_at).where(_runs.c.id == before)
                                .scalar_subquery())
        with self._engine.connect() as c:
            rows = c.execute(query.order_by(_runs.c.finished_at.desc()).limit(limit)).all()
        return [run_as_dict(r) for r in rows]

    # ------------------------------------------------------------- recovery (rekku.reconciler)
    def take_back_lost_runs(self, held: dict[str, list[str]], limit: int) -> tuple[set[str], set[str]]:
        """running → queued for the actions dead worker incarnations were running (``held``: worker →
        action ids), each lost run counted; → cancelled where a cancel was asked; → failed at ``limit``
        lost runs (a poison message: :func:`lost_error`). Returns ``(back in queued, failed)``. Only a row
        still held by that very worker moves, so a repeat (or a live worker's newer claim) changes nothing."""
        def work(c: Connection) -> tuple[set[str], set[str]]:
            now = utcnow()
            ids = sorted({i for held_ids in held.values() for i in held_ids})
            for worker, worker_ids in held.items():
                c.execute(sa.update(_runs)
                          .where(_runs.c.id.in_(worker_ids), _runs.c.status == RUNNING, _runs.c.worker == worker)
                          .values(status=QUEUED, lost_runs=_runs.c.lost_runs + 1, updated_at=now,
                                  error="its worker stopped while running it; re-enqueued"))
            c.execute(sa.update(_runs).where(_runs.c.id.in_(ids), _runs.c.status == QUEUED,
                                             _runs.c.cancel_requested.is_(True))
                      .values(status=CANCELLED, error="cancelled (its worker stopped)", finished_at=now))
            failed = set()
            for row in c.execute(sa.select(_runs.c.id, _runs.c.lost_runs)
                                 .where(_runs.c.id.in_(ids), _runs.c.status == QUEUED, _runs.c.lost_runs >= limit)):
                c.execute(sa.update(_runs).where(_runs.c.id == row.id, _runs.c.status == QUEUED)
                          .values(status=FAILED, error=lost_error(row.lost_runs, limit), finished_at=now))
                failed.add(row.id)
            queued = {row.id for row in c.execute(sa.select(_runs.c.id).where(_runs.c.id.in_(ids),
                                                                                _runs.c.status == QUEUED))}
            return queued, failed

        return self._do(work)

    def mark_taken(self, action_ids: list[str], worker: str) -> None:
        """Queued actions a dead worker had taken but never claimed (prefetched) are marked as delivered
        to it, so their next delivery writes its claim before running (rekku_workers.claim)."""
        self._do(lambda c: c.execute(sa.update(_runs).where(_runs.c.id.in_(action_ids), _runs.c.status == QUEUED,
                                                            _runs.c.worker.is_(None)).values(worker=worker)))

    def restart_grace(self, action_ids: list[str]) -> None:
        """Queued actions just re-enqueued get a fresh REKKU_RECONCILE_GRACE before the next look."""
        now = utcnow()
        self._do(lambda c: c.execute(sa.update(_runs).where(_runs.c.id.in_(action_ids), _runs.c.status == QUEUED)
                                     .values(updated_at=now)))

    def move_to_queues(self, moved: dict[str, str]) -> None:
        """Record the queue each action was routed to anew (action id → queue; a dead node's own queue)."""
        def work(c: Connection) -> None:
            for queue in set(moved.values()):
                c.execute(sa.update(_runs).where(_runs.c.id.in_([i for i, q in moved.items() if q == queue]))
                          .values(queue=queue))

        self._do(work)

    def reset_for_retry(self, action_id: str) -> dict | None:
        """failed → queued (attempts kept, error kept until the next run), for a manual retry; its lost
        runs start again from 0 (REKKU_MAX_ATTEMPTS counts afresh)."""
        with self._engine.begin() as c:
            changed = c.execute(sa.update(_runs).where(_runs.c.id == action_id, _runs.c.status == FAILED)
                                .values(status=QUEUED, finished_at=None, lost_runs=0,
                                        updated_at=utcnow())).rowcount
        return self.get(action_id) if changed else None

    @staticmethod
    def is_final(status: str) -> bool:
        return status in FINAL_STATES


def stuck_condition(grace_seconds: float) -> sa.ColumnElement[bool]:
    """Not finished and not touched for longer than ``grace_seconds`` (REKKU_RECONCILE_GRACE), on the
    (status, updated_at) index: what `rekku status --stuck` lists and ``rekku_stuck_actions`` counts."""
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    return _UNFINISHED & (_runs.c.updated_at < cutoff)


_shared: ActionLog | None = None


def shared_log() -> ActionLog:
    """The process's ActionLog on the configured database (safe across fork: the engine re-pools)."""
    global _shared
    if _shared is None:
        _shared = ActionLog()
    return _shared
