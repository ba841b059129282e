"""The terminal session host: the processes and shells of one terminal node.

It lives in the terminal worker's one process (the pool runs Celery's threads pool, see
rekku/pools.py), so every persistent shell of a node is reachable from every task thread. Nothing
here knows Celery or Redis: ``plugins/terminal.py`` shapes actions and results, and
``plugins/terminal/sessions.py`` tells nodes apart.

- A one-off command runs as ``bash -c`` in its own process group, with a clean environment, stdin
  from /dev/null and its output read through a selector (never more than the cap kept in memory).
  On timeout the group gets SIGTERM, then SIGKILL; processes it leaves behind are killed when it ends.
- A persistent session is one ``bash`` reading commands from a pipe. Each command is written as
  ``eval '<command>' </dev/null`` followed by a random per-command marker (with ``$?``) on stdout and
  on stderr, and its output is read up to those markers, so neither output nor exit code can ever be
  attributed to another command. On timeout the processes the command started are interrupted
  (SIGINT, then SIGKILL); if the shell still does not come back (a busy builtin loop, a redirected
  stdout), the shell is replaced by a fresh one. The outcome says which.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rekku.plugin import PluginError

from .output import Capture, Framer, Pump
from .settings import TerminalSettings

#: The shell commands run in.
BASH = shutil.which("bash") or "/bin/bash"
#: Seconds between SIGTERM (one-off) or SIGINT (session command) and SIGKILL.
KILL_GRACE = 2.0
#: Seconds a one-off's output may still arrive after its main process exited.
DRAIN_AFTER_EXIT = 0.3
#: A one-off: its resource limits, then the command (passed as $1, so no quoting is involved).
_ONE_OFF_SCRIPT = '{limits}eval "$1"'
#: The umask commands run with: a shell's usual one, not the 077 every `rekku` process has (rekku.cli),
#: which is for Rekku's own files; what a trainer's command writes is the command's business.
COMMAND_UMASK = 0o022


class HostError(PluginError):
    """The host cannot do what was asked (too many sessions, a missing directory, ...)."""


@dataclass(frozen=True)
class Limits:
    """How commands run: output cap, optional user and resource limits (None = not limited)."""

    max_output: int = 65536
    run_as: str | None = None
    cpu_seconds: int | None = None
    address_space: int | None = None
    processes: int | None = None

    @classmethod
    def from_settings(cls, settings: TerminalSettings) -> Limits:
        return cls(settings.max_output, settings.run_as or None, settings.rlimit_cpu, settings.rlimit_as,
                   settings.rlimit_nproc)

    def ulimit(self) -> str:
        """Shell line setting the limits (soft and hard: a command cannot raise them again), or "".

        Set by the shell itself, as the command's user, before it reads any command: a parent's
        ``prlimit(2)`` on another user's process needs CAP_SYS_RESOURCE, which containers often lack."""
        flags = [(flag, value) for flag, value in (("-t", self.cpu_seconds), ("-u", self.processes),
                                                   ("-v", self.address_space and max(1, self.address_space // 1024)))
                 if value]
        if not flags:
            return ""
        return "ulimit " + " ".join(f"{flag} {value}" for flag, value in flags) + " || exit 126\n"


@dataclass
class Outcome:
    """What a command did. ``exit_code`` is None when it was ended by a signal (named in ``signal``)."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: str | None = None
    duration: float = 0.0
    truncated: bool = False
    timed_out: bool = False
    interrupted: bool = False
    session_reset: bool = False
    shell_exited: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"stdout": self.stdout, "stderr": self.stderr, "exit_code": self.exit_code,
                "signal": self.signal, "duration": round(self.duration, 3), "truncated": self.truncated,
                "timed_out": self.timed_out}


# ----------------------------------------------------------------------------- processes
def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it has no process left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _parents() -> dict[int, int]:
    """pid → parent pid of every process (from /proc)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_env(limits: Limits) -> dict[str, str]:
    """A small, clean environment: commands never see the worker's secrets (tokens, database URLs)."""
    if limits.run_as:
        entry = pwd.getpwnam(limits.run_as)
        user, home = entry.pw_name, entry.pw_dir
    else:
        entry = pwd.getpwuid(os.getuid())
        user, home = entry.pw_name, entry.pw_dir or os.path.expanduser("~")
    env = {"PATH": os.environ.get("PATH") or os.defpath, "HOME": home, "USER": user, "LOGNAME": user,
           "SHELL": BASH, "LANG": os.environ.get("LANG") or "C.UTF-8", "TERM": "dumb",
           "PAGER": "cat", "GIT_PAGER": "cat"}
    if os.environ.get("TZ"):
        env["TZ"] = os.environ["TZ"]
    return env


def spawn(argv: list[str], limits: Limits, cwd: str | None, stdin: int = subprocess.PIPE) -> subprocess.Popen:
    """Start ``argv`` in its own session (so its group can be killed), as ``run_as``."""
    env = command_env(limits)
    if not cwd:
        cwd = env["HOME"] if os.path.isdir(env["HOME"]) else "/"  # nobody's home is /nonexistent
    cwd = os.path.expanduser(cwd)
    if not os.path.isdir(cwd):
        raise HostError(f"directory '{cwd}' does not exist on this node")
    options: dict[str, Any] = {}
    if limits.run_as:
        entry = pwd.getpwnam(limits.run_as)
        options.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, close_fds=True, umask=COMMAND_UMASK,
                                **options)
    except PermissionError as exc:
        if limits.run_as:
            raise HostError(f"cannot run commands as '{limits.run_as}' (TERMINAL_RUN_AS): the worker "
                            f"needs to run as root for that ({exc})") from None
        raise HostError(str(exc)) from None


def _exit_status(returncode: int | None, outcome: Outcome) -> None:
    if returncode is not None and returncode < 0:
        outcome.exit_code, outcome.signal = None, signal.Signals(-returncode).name
    else:
        outcome.exit_code = returncode


def run_once(command: str, timeout: float, limits: Limits, cwd: str | None = None) -> Outcome:
    """Run a one-off command in its own process group; kill the whole group on timeout."""
    start = time.monotonic()
    script = _ONE_OFF_SCRIPT.format(limits=limits.ulimit())
    proc = spawn([BASH, "--noprofile", "--norc", "-c", script, "rekku-terminal", command], limits, cwd,
                 stdin=subprocess.DEVNULL)
    out, err = Capture(limits.max_output), Capture(limits.max_output)
    pump = Pump({proc.stdout: out.add, proc.stderr: err.add})
    outcome = Outcome()
    try:
        deadline = start + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            _wait_a_little(proc, pump, deadline)
        if proc.poll() is None:
            outcome.timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            grace = time.monotonic() + KILL_GRACE
            while proc.poll() is None and time.monotonic() < grace:
                _wait_a_little(proc, pump, grace)
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
                outcome.notes.append(f"timed out after {timeout:g} s; it ignored SIGTERM, so its process group "
                                     "was killed with SIGKILL")
            else:
                outcome.notes.append(f"timed out after {timeout:g} s; its process group was terminated (SIGTERM)")
        pump.read(until=time.monotonic() + DRAIN_AFTER_EXIT)
        if _signal_group(proc.pid, signal.SIGKILL) and not outcome.timed_out:
            outcome.notes.append("processes it left running in the background were killed "
                                 "(use a persistent session to keep background jobs)")
            pump.read(until=time.monotonic() + 1.0)
    finally:
        pump.close()
        for stream in (proc.stdout, proc.stderr):
            stream.close()
    _exit_status(proc.returncode, outcome)
    outcome.stdout, outcome.stderr = out.text(), err.text()
    outcome.truncated = out.truncated or err.truncated
    outcome.duration = time.monotonic() - start
    return outcome


def _wait_a_little(proc: subprocess.Popen, pump: Pump, until: float) -> None:
    step = min(until, time.monotonic() + 0.1)
    if pump.open:
        pump.read(until=step)
    else:
        try:
            proc.wait(max(0.0, step - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


# ----------------------------------------------------------------------------- persistent shells
class Shell:
    """One persistent bash: commands run one at a time, framed by per-command markers."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.name, self.limits = name, limits
        self.id = uuid.uuid4().hex
        self.proc = spawn([BASH, "--noprofile", "--norc", "-s"], limits, None)
        if limits.ulimit():
            self.proc.stdin.write(limits.ulimit().encode())
            self.proc.stdin.flush()
        self.created = time.time()
        self.last_used = time.monotonic()
        self.commands = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    def run(self, command: str, timeout: float, cwd: str | None = None) -> Outcome:
        start = time.monotonic()
        self.commands += 1
        marker = "__rekku_" + secrets.token_hex(16)
        script = (f"cd -- {shlex.quote(os.path.expanduser(cwd))} && " if cwd else "")
        script += (f"eval {shlex.quote(command)} </dev/null\n"
                   f"printf '\\n%s %s\\n' {marker} \"$?\"\n"
                   f"printf '\\n%s\\n' {marker} >&2\n")
        out, err = Capture(self.limits.max_output), Capture(self.limits.max_output)
        out_frame, err_frame = Framer(out, marker, True), Framer(err, marker, False)
        outcome = Outcome()
        before = descendants(self.proc.pid)
        pump = Pump({self.proc.stdout: out_frame.feed, self.proc.stderr: err_frame.feed})

        def framed() -> bool:
            return out_frame.done and err_frame.done

        try:
            try:
                self.proc.stdin.write(script.encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass  # the shell is gone; reading finds EOF and says so
            pump.read(until=start + timeout, stop=framed)
            if not framed() and pump.open:
                outcome.timed_out = True
                self._interrupt(before, pump, framed, timeout, outcome)
            elif not framed():
                self.proc.wait(5)
                outcome.shell_exited = True
                outcome.notes.append(f"the shell exited (status {self.proc.returncode}); the session is closed")
        finally:
            pump.close()
        out_frame.flush()
        err_frame.flush()
        if outcome.shell_exited:
            _exit_status(self.proc.returncode, outcome)
        elif framed():
            outcome.exit_code = out_frame.code
        outcome.stdout, outcome.stderr = out.text(), err.text()
        outcome.truncated = out.truncated or err.truncated
        outcome.duration = time.monotonic() - start
        self.last_used = time.monotonic()
        return outcome

    def _interrupt(self, before: set[int], pump: Pump, framed: Callable[[], bool], timeout: float,
                   outcome: Outcome) -> None:
        """A command ran out of time: stop what it started, or replace the shell when that is not enough."""
        for sig in (signal.SIGINT, signal.SIGKILL):
            started = descendants(self.proc.pid) - before
            if not started:
                break
            for pid in started:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            pump.read(until=time.monotonic() + KILL_GRACE, stop=framed)
            if framed():
                outcome.interrupted = True
                outcome.notes.append(f"timed out after {timeout:g} s; the command was interrupted "
                                     f"({sig.name}) and the session keeps its state")
                return
        self.kill()
        outcome.session_reset = True
        outcome.notes.append(f"timed out after {timeout:g} s and the shell did not come back, so the session's "
                             "shell was replaced by a fresh one: its directory, variables and background jobs "
                             "are gone")

    def kill(self) -> None:
        """End the shell and everything in its process group."""
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Let the shell end on EOF, then kill what is left (background jobs) with its group."""
        try:
            self.proc.stdin.close()
            self.proc.wait(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class SessionHost:
    """The persistent shells of this process, by session name; one command at a time per session."""

    def __init__(self, max_sessions: int = 32) -> None:
        self.max_sessions = max_sessions
        self._shells: dict[str, Shell] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, name: str) -> threading.Lock:
        """The lock a caller holds while it uses (or replaces) session ``name``."""
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def get(self, name: str) -> Shell | None:
        with self._guard:
            return self._shells.get(name)

    def names(self) -> list[str]:
        with self._guard:
            return sorted(self._shells)

    def open(self, name: str, limits: Limits) -> Shell:
        """A fresh shell for ``name`` (closing the one it had). Hold ``lock(name)``."""
        self.close(name)
        with self._guard:
            if len(self._shells) >= self.max_sessions:
                raise HostError(f"this node already holds {self.max_sessions} sessions (TERMINAL_MAX_SESSIONS); "
                                "close one with terminal_close_session")
        shell = Shell(name, limits)
        with self._guard:
            self._shells[name] = shell
        return shell

    def close(self, name: str) -> Shell | None:
        """Close session ``name``; returns its shell, or None when there was none. Hold ``lock(name)``."""
        with self._guard:
            shell = self._shells.pop(name, None)
        if shell is not None:
            shell.close()
        return shell

    def reap(self, max_idle: float) -> list[Shell]:
        """Close sessions idle for more than ``max_idle`` seconds (or whose shell died); busy ones are left."""
        closed = []
        for name in self.names():
            shell = self.get(name)
            if shell is None or (shell.alive and shell.idle_for() <= max_idle):
                continue
            lock = self.lock(name)
            if not lock.acquire(blocking=False):
                continue
            try:
                if self.get(name) is shell:
                    self.close(name)
                    closed.append(shell)
            finally:
                lock.release()
        return closed

    def shutdown(self) -> None:
        for name in self.names():
            self.close(name)
