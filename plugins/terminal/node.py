"""One terminal node at run time: its session host, its heartbeat and idle reaper, and the rules that
keep a persistent session on the node that holds its shell.

A command for session S reaching node N (after the ingress claimed S for N, see
plugins/terminal/sessions.py):

- S is held by another node that is alive (a race, or a stale route): refused with a clear error,
  never run here with missing state;
- S's shell is here: the command runs in it;
- S had a shell that is gone (its node died, or this worker restarted, or the shell was killed):
  a fresh shell is started and registered, and the command is *not* run: the answer says the
  session was lost, so a command that relied on the lost directory or variables (``rm -rf build``
  after ``cd project``) never runs somewhere else;
- S is new: a shell is started and the command runs in it.

Commands of one session sent in one batch run in the batch's order: the node runs several commands
at once (threads), so a command first waits until the earlier commands of its session in its batch
have finished (:meth:`TerminalNode.await_earlier`, fed by :meth:`TerminalNode.finished`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from .host import HostError, Limits, Outcome, SessionHost, run_once
from .sessions import SessionRegistry

log = logging.getLogger(__name__)

#: How many finished action ids a node remembers for ordering (older ones are read from the action log).
FINISHED_MEMORY = 4096
#: Seconds between reads of the action log while waiting for earlier commands.
LOG_POLL = 0.5


class SessionElsewhere(HostError):
    """The session's shell lives on another node that is alive."""


class TerminalNode:
    """The sessions of this worker process, registered in Redis under ``name``."""

    def __init__(self, name: str, registry: SessionRegistry, limits: Callable[[], Limits], *,
                 idle: float = 900.0, max_sessions: int = 32) -> None:
        self.name, self.registry, self.limits, self.idle = name, registry, limits, idle
        self.host = SessionHost(max_sessions)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Lock()
        self._turns = threading.Condition()
        self._finished: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Announce the node (once, synchronously) and keep announcing it; idempotent."""
        with self._started:
            if self._thread is not None:
                return
            self.registry.beat(self.name, 0)
            self._thread = threading.Thread(target=self._loop, name=f"terminal-node-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.forget_node(self.name)
        except Exception:
            log.warning("could not remove terminal node %s from the registry", self.name, exc_info=True)
        self.host.shutdown()

    def _loop(self) -> None:
        interval = max(0.2, self.registry.node_ttl / 3)
        while not self._stop.wait(interval):
            try:
                self.registry.beat(self.name, len(self.host.names()))
                for shell in self.host.reap(self.idle):
                    log.info("closed idle terminal session %s", shell.name)
                    self.registry.release(shell.name, shell.id)
            except Exception:  # Redis away for a moment: keep beating
                log.warning("terminal node %s heartbeat failed", self.name, exc_info=True)

    # ------------------------------------------------------------------ order within a batch
    def finished(self, action_id: str) -> None:
        """``action_id`` (a session command run here) is done: commands waiting for it may go."""
        with self._turns:
            self._finished[action_id] = None
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self._turns.notify_all()

    def await_earlier(self, earlier: Iterable[str], finished_in_log: Callable[[list[str]], set[str]],
                      patience: float) -> list[str]:
        """Wait until every action of ``earlier`` finished (here, or as the action log says); returns
        those still unfinished after ``patience`` seconds without any of them finishing (else [])."""
        pending = set(earlier)
        deadline = time.monotonic() + patience
        next_read = 0.0
        with self._turns:
            while pending:
                before = len(pending)
                pending -= self._finished.keys()
                now = time.monotonic()
                if pending and now >= next_read:
                    self._turns.release()
                    try:
                        done = finished_in_log(sorted(pending))
                    finally:
                        self._turns.acquire()
                    pending -= done
                    next_read = now + LOG_POLL
                if len(pending) < before:
                    deadline = now + patience  # progress: the next one gets its own time
                if not pending:
                    break
                if now >= deadline:
                    return sorted(pending)
                self._turns.wait(min(LOG_POLL, deadline - now))
        return []

    # ------------------------------------------------------------------ commands
    def one_off(self, command: str, timeout: float, cwd: str | None) -> Outcome:
        return run_once(command, timeout, self.limits(), cwd)

    def session_command(self, session: str, command: str, timeout: float, cwd: str | None) -> dict[str, Any]:
        """Run ``command`` in ``session``; returns the outcome plus ``session_lost``, ``new_session``."""
        lock = self.host.lock(session)
        if not lock.acquire(timeout=timeout):
            raise HostError(f"session '{session}' is still busy with another command after {timeout:g} s")
        try:
            owner = self.registry.claim(session, self.name)
            if owner != self.name:
                raise SessionElsewhere(f"session '{session}' lives on terminal node '{owner}', which is alive, "
                                       f"but this command reached node '{self.name}'; it was not run here. "
                                       "Send it again: it is routed to the session's node.")
            entry = self.registry.entry(session) or {}
            shell = self.host.get(session)
            if shell is not None and shell.alive and entry.get("shell") in (None, shell.id):
                self.registry.bind(session, self.name, shell.id)
                return self._run(session, shell, command, timeout, cwd, new=False)
            lost = self._loss(entry, shell)
            shell = self.host.open(session, self.limits())
            self.registry.bind(session, self.name, shell.id)
            if lost:
                return {"outcome": Outcome(notes=[f"session '{session}' was lost: {lost}. A new session was "
                                                  f"started on node '{self.name}' and the command was NOT run; "
                                                  "send it again (with any cd/export it relied on)."]),
                        "session_lost": True, "new_session": True, "ran": False}
            return self._run(session, shell, command, timeout, cwd, new=True)
        finally:
            lock.release()

    def _loss(self, entry: dict, shell: Any) -> str | None:
        """Why the session's previous state is gone, or None if it had none."""
        if entry.get("shell"):
            if shell is not None and entry["shell"] == shell.id:
                return f"its shell exited unexpectedly (status {shell.proc.returncode})"
            return f"its shell on node '{entry.get('node')}' is gone (the worker was restarted)"
        if entry.get("lost_from"):
            return f"its node '{entry['lost_from']}' is gone"
        return None

    def _run(self, session: str, shell: Any, command: str, timeout: float, cwd: str | None,
             new: bool) -> dict[str, Any]:
        outcome = shell.run(command, timeout, cwd)
        if outcome.session_reset:
            fresh = self.host.open(session, self.limits())
            self.registry.bind(session, self.name, fresh.id)
        elif outcome.shell_exited:
            self.host.close(session)
            self.registry.release(session, shell.id)
        else:
            self.registry.touch(session)
        return {"outcome": outcome, "session_lost": False, "new_session": new, "ran": True}

    def close_session(self, session: str) -> dict[str, Any]:
        lock = self.host.lock(session)
        if not lock.acquire(timeout=30):
            raise HostError(f"session '{session}' is still busy with another command")
        try:
            entry = self.registry.entry(session)
            owner = entry.get("node") if entry else None
            if owner and owner != self.name and self.registry.alive(owner):
                raise SessionElsewhere(f"session '{session}' lives on terminal node '{owner}', which is alive, "
                                       f"but this request reached node '{self.name}'; send it again.")
            shell = self.host.close(session)
            if entry is not None:
                self.registry.release(session)
            if shell is not None:
                return {"closed": True, "notice": None}
            if entry is not None and entry.get("shell") and owner != self.name:
                return {"closed": False, "notice": f"session '{session}' was already lost: its node '{owner}' is gone"}
            return {"closed": False, "notice": f"there is no open session '{session}'"}
        finally:
            lock.release()
