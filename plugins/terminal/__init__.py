"""terminal: shell commands for trainers, one-off or in persistent sessions pinned to terminal nodes.

Upstream's ``terminal`` action (``command``; *``persistent_session``*) with its bugs fixed
(docs/plugins.md §2): only trainers may run it (checked at the ingress and again in the worker, and an
action with no user is no trainer); every caller gets their own session instead of one shared
shell; each command is framed by a per-command marker instead of a per-line timeout, so the shell
never gets out of sync; one-off commands have a timeout too.

TERMINAL_ALLOW, when set, accepts only plain programs and arguments (optionally joined by ``|``,
``&&``, ``||``, ``;``) whose every program is listed (:func:`policy_errors`), at the ingress and again
in the worker. It is still not a sandbox: the boundary is TERMINAL_RUN_AS (an unprivileged user),
with the TERMINAL_RLIMIT_* limits or a container. TERMINAL_DENY alone is advisory.

This module shapes actions: schemas, validation, routing at the ingress, results. The processes
live in plugins/terminal/host.py, the node's run-time rules in plugins/terminal/node.py and the
session → node registry in plugins/terminal/sessions.py.
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
import threading
from typing import Any

from celery.signals import celeryd_after_setup, worker_shutdown

from rekku.plugin import (
    ActionLog,
    AIPluginBase,
    NotAuthorized,
    ValidationError,
    current_action,
    get_settings,
    register_plugin,
    shared_log,
)

from .host import KILL_GRACE, HostError, Limits, run_once
from .node import TerminalNode
from .sessions import SessionRegistry
from .settings import TerminalSettings

log = logging.getLogger(__name__)

#: Longest accepted command, in characters.
MAX_COMMAND_CHARS = 16384
#: Longest accepted ``cwd``, in characters.
MAX_CWD_CHARS = 4096
#: What a session name may contain (at most 128 characters).
SESSION_NAME = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}")
#: Seconds an action may run beyond TERMINAL_MAX_TIMEOUT (kill grace, a shell restart, the registry).
TIME_MARGIN = 30.0
#: Shell words after which the next word is a command, not a program.
_KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}",
                       "time", "esac", "in"})
_OPERATORS = frozenset({";", "&", "&&", "|", "||", "|&", ";;", "(", ")", "\n"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")

_DESCRIPTIONS = {
    "terminal": "Run a shell command on a terminal node (trainers only). One-off by default; with "
                "persistent_session true it runs in a shell that keeps its directory, variables and "
                "background jobs between commands (one session per chat unless 'session' names one).",
    "terminal_close_session": "Close a persistent terminal session (default: this chat's), ending its shell.",
    "terminal_list_sessions": "List the persistent terminal sessions and the node holding each.",
}


def _programs(command: str) -> list[str] | None:
    """The programs a command line starts (best effort: first word of each simple command), or None
    when it cannot be parsed. Used for TERMINAL_DENY alone, which is therefore advisory (a guard
    against mistakes: ``$(printf rm)`` or ``eval`` get past it); TERMINAL_ALLOW uses the strict
    :func:`simple_commands`."""
    lexer = shlex.shlex(command.replace("$(", "; ").replace("`", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace = " \t\r"
    lexer.wordchars += "~-./+:=@%,"
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    programs, expect = [], True
    skip_rest = False
    for token in tokens:
        if token in _OPERATORS or set(token) <= set(";&|()\n"):
            expect, skip_rest = True, False
        elif skip_rest or not expect:
            continue
        elif token in ("for", "case", "select", "function"):
            skip_rest = True
        elif token in _KEYWORDS or _ASSIGNMENT.match(token):
            continue
        elif token in ("<", ">", ">>", "<<", "<<<", ">&", "<&", "&>"):
            expect = False
        else:
            programs.append(token.rsplit("/", 1)[-1])
            expect = False
    return programs


class ShellSyntaxError(ValueError):
    """The command uses shell syntax TERMINAL_ALLOW does not accept (``what`` says which)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


#: Characters that are shell syntax anywhere outside single quotes: expansions, substitutions,
#: escapes, redirections (``<``, ``>``, ``<(…)``, ``<<<``), subshells and grouping, background ``&``.
_OUTSIDE_QUOTES = frozenset("$`\\()<>{}&|;")
#: Of those, the ones still active inside double quotes.
_IN_DOUBLE_QUOTES = frozenset("$`\\")
#: Operators joining simple commands that TERMINAL_ALLOW accepts (each command is checked).
_JOINERS = ("&&", "||", "|", ";")


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of ``command``, which may only be simple commands joined by
    ``|``, ``&&``, ``||`` or ``;``, their words plain or quoted text: no expansion (``$``, backquotes,
    globbing is fine in arguments), no redirection, no substitution, no escape, no grouping, no
    background job, no newline. What bash would run is then exactly these words, so the first word of
    each is the program. Raises :class:`ShellSyntaxError` otherwise."""
    commands: list[list[str]] = [[]]
    word: list[str] | None = None
    i, n = 0, len(command)

    def end_word() -> None:
        nonlocal word
        if word is not None:
            commands[-1].append("".join(word))
            word = None

    while i < n:
        char = command[i]
        if char in " \t":
            end_word()
            i += 1
        elif char == "'":
            close = command.find("'", i + 1)
            if close < 0:
                raise ShellSyntaxError("an unclosed single quote")
            word = (word or []) + [command[i + 1:close]]
            i = close + 1
        elif char == '"':
            close = command.find('"', i + 1)
            if close < 0:
                raise ShellSyntaxError("an unclosed double quote")
            inner = command[i + 1:close]
            found = sorted(set(inner) & _IN_DOUBLE_QUOTES)
            if found:
                raise ShellSyntaxError(f"'{found[0]}' in double quotes")
            word = (word or []) + [inner]
            i = close + 1
        elif (joiner := next((j for j in _JOINERS if command.startswith(j, i)), None)) and \
                not command.startswith(("|&", ";;", "&&&", "|||"), i):
            end_word()
            if not commands[-1]:
                raise ShellSyntaxError(f"'{joiner}' without a command before it")
            commands.append([])
            i += len(joiner)
        elif char in _OUTSIDE_QUOTES:
            raise ShellSyntaxError(f"'{char}'")
        elif char in "\n\r" or ord(char) < 32 or ord(char) == 127:
            raise ShellSyntaxError("a newline" if char in "\n\r" else f"the control character {ord(char):#04x}")
        else:
            word = (word or []) + [char]
            i += 1
    end_word()
    if not commands[-1]:
        if len(commands) == 1:
            raise ShellSyntaxError("no command")
        commands.pop()  # a trailing ';' is harmless
    return commands


def _allow_errors(command: str, allow: set[str], deny: set[str]) -> list[str]:
    """TERMINAL_ALLOW: every program must be named exactly as allowed ("ls", not "/tmp/x/ls")."""
    try:
        commands = simple_commands(command)
    except ShellSyntaxError as exc:
        return [f"Field 'command' uses shell syntax that TERMINAL_ALLOW does not permit ({exc.what}): with "
                "TERMINAL_ALLOW set, a command is plain programs and arguments, optionally joined by |, &&, || "
                "or ; (quote arguments in single quotes; no $, backquotes, redirections, subshells or escapes) "
                "for action 'terminal'"]
    denied = sorted({words[0] for words in commands if words[0] not in allow or words[0] in deny})
    if denied:
        return [f"Field 'command' runs programs that are not allowed on this system ({', '.join(denied)}) "
                "for action 'terminal'"]
    return []


def policy_errors(command: str, settings: TerminalSettings) -> list[str]:
    """Why TERMINAL_ALLOW / TERMINAL_DENY refuse ``command`` (empty when they allow it).

    With TERMINAL_ALLOW, a command is accepted only when :func:`simple_commands` can read it and each
    of its programs is allowed (and not denied): ``ls <(id)``, ``cat <<<"$(id)"`` or
    ``ls > /etc/cron.d/x`` are refused. Still not a sandbox — an allowed program may run others
    (``find -exec``, ``git -c core.pager=…``, ``awk 'BEGIN{system(…)}'``): allow only programs that do
    not, and contain what runs with TERMINAL_RUN_AS (an unprivileged user), the TERMINAL_RLIMIT_*
    limits or a container. TERMINAL_DENY alone is advisory (see :func:`_programs`)."""
    allow = {p.strip() for p in settings.allow.split(",") if p.strip()}
    deny = {p.strip() for p in settings.deny.split(",") if p.strip()}
    if not allow and not deny:
        return []
    if allow:
        return _allow_errors(command, allow, deny)
    programs = _programs(command)
    if programs is None:
        return ["Field 'command' could not be parsed to check it against TERMINAL_ALLOW/TERMINAL_DENY "
                "for action 'terminal'"]
    denied = sorted({p for p in programs if p in deny or (allow and p not in allow)})
    if denied:
        return [f"Field 'command' runs programs that are not allowed on this system ({', '.join(denied)}) "
                "for action 'terminal'"]
    return []


def default_session(context: Any) -> str:
    """One session per interface and chat (per user when there is no chat)."""
    get = context.get if isinstance(context, dict) else lambda k: getattr(context, k, None)
    interface = get("interface") or "none"
    where = get("chat_id") or f"user-{get('user_id') or 'none'}"
    return re.sub(r"[^A-Za-z0-9_.:@/+=-]", "_", f"{interface}:{where}")[:128]


def session_of(payload: dict, context: Any) -> str:
    return payload.get("session") or default_session(context)


def _session_action(run: dict) -> bool:
    """A logged action that runs in a persistent session (a command, or its close)."""
    payload = run.get("payload") or {}
    return (run.get("type") == "terminal" and payload.get("persistent_session") is True) or \
        run.get("type") == "terminal_close_session"


def _earlier_in_batch(ctx: Any, session: str) -> list[str]:
    """Ids of the actions of ``session`` before this one in its batch (the batch's order is the order given)."""
    if not getattr(ctx, "batch_id", None):
        return []
    earlier = []
    for run in shared_log().batch(ctx.batch_id) or []:  # by position
        if run["id"] == ctx.action_id:
            return earlier
        if _session_action(run) and session_of(run.get("payload") or {}, run.get("context") or {}) == session:
            earlier.append(run["id"])
    return []  # not in its batch (an action made past the ingress): nothing to wait for


def _finished_in_log(action_ids: list[str]) -> set[str]:
    """Which of ``action_ids`` the action log says are final (ran elsewhere, refused, cancelled)."""
    log_ = shared_log()
    done = set()
    for action_id in action_ids:
        run = log_.get(action_id)
        if run is None or ActionLog.is_final(run["status"]):
            done.add(action_id)
    return done


# ----------------------------------------------------------------------------- node run time
_nodes: dict[str, TerminalNode] = {}
_nodes_lock = threading.Lock()
_registry: SessionRegistry | None = None


def registry() -> SessionRegistry:
    global _registry
    if _registry is None:
        _registry = SessionRegistry.from_settings(TerminalSettings.get())
    return _registry


def node_runtime(name: str) -> TerminalNode:
    """This process's node ``name``, started (heartbeat, idle reaper) on first use."""
    with _nodes_lock:
        node = _nodes.get(name)
        if node is None:
            settings = TerminalSettings.get()
            node = TerminalNode(name, registry(), lambda: Limits.from_settings(TerminalSettings.get()),
                                idle=settings.session_idle, max_sessions=settings.max_sessions)
            _nodes[name] = node
    node.start()
    return node


def _consumes_own_queue(app: Any, node: str) -> bool:
    return f"terminal.{node}" in app.amqp.queues.consume_from


@celeryd_after_setup.connect(weak=False)
def _announce_node(sender: str, instance: Any, **_: Any) -> None:
    """A worker that consumes ``terminal.<node>`` announces itself at start, before any action."""
    node = str(sender).rpartition("@")[2]
    if _consumes_own_queue(instance.app, node):
        node_runtime(node)


@worker_shutdown.connect(weak=False)
def _retire_nodes(**_: Any) -> None:
    for node in list(_nodes.values()):
        node.stop()


# ----------------------------------------------------------------------------- the plugin
class TerminalPlugin(AIPluginBase):
    pool = "terminal"
    trainer_only = True
    #: Never retried: a command may have done half of its work.
    max_retries = 0
    settings_class = TerminalSettings

    def __init__(self) -> None:
        #: The longest command plus the kill grace and a shell restart.
        self.time_limit = TerminalSettings.get().max_timeout + 2 * KILL_GRACE + TIME_MARGIN
        register_plugin("terminal", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return list(_DESCRIPTIONS)

    def get_supported_actions(self) -> dict:
        return {
            "terminal": {"description": _DESCRIPTIONS["terminal"], "required_fields": ["command"],
                         "optional_fields": ["persistent_session", "session", "timeout", "cwd"]},
            "terminal_close_session": {"description": _DESCRIPTIONS["terminal_close_session"],
                                       "required_fields": [], "optional_fields": ["session"]},
            "terminal_list_sessions": {"description": _DESCRIPTIONS["terminal_list_sessions"],
                                       "required_fields": [], "optional_fields": []},
        }

    def get_prompt_instructions(self, action_name: str) -> dict:
        settings = TerminalSettings.get()
        if action_name == "terminal":
            return {
                "description": _DESCRIPTIONS["terminal"],
                "payload": {
                    "command": {"type": "string", "description": "bash command line", "required": True},
                    "persistent_session": {"type": "boolean", "default": False,
                                           "description": "run in this chat's persistent shell"},
                    "session": {"type": "string", "description": "name of a persistent session (letters, digits, "
                                                                 "_.:@/+=-); default: one per chat"},
                    "timeout": {"type": "number", "description": f"seconds (at most {settings.max_timeout:g}, "
                                                                 f"default {settings.default_timeout:g})"},
                    "cwd": {"type": "string",
                            "description": "directory to run in (in a persistent session: cd there first)"},
                },
                "result": "stdout, stderr, exit_code, duration, truncated, timed_out, session, node, notice",
            }
        if action_name == "terminal_close_session":
            return {"description": _DESCRIPTIONS[action_name],
                    "payload": {"session": {"type": "string", "description": "default: this chat's session"}}}
        if action_name == "terminal_list_sessions":
            return {"description": _DESCRIPTIONS[action_name], "payload": {}}
        return {}

    def unavailable_reason(self) -> str | None:
        if not get_settings().trainer_ids:
            return "no trainer is configured (TRAINER_IDS or TELEGRAM_TRAINER_ID): terminal actions are trainer-only"
        return None

    # ------------------------------------------------------------------ validation
    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        errors = []
        if action_type in ("terminal", "terminal_close_session") and "session" in payload:
            session = payload["session"]
            if not isinstance(session, str) or not SESSION_NAME.fullmatch(session):
                errors.append(f"Field 'session' must be a name of 1 to 128 letters, digits or _.:@/+=- "
                              f"for action '{action_type}'")
        if action_type != "terminal":
            return errors
        command = payload.get("command")
        if not isinstance(command, str) or not command.strip():
            return ["Field 'command' must be a non-empty string for action 'terminal'"] + errors
        if len(command) > MAX_COMMAND_CHARS:
            errors.append(f"Field 'command' is too long for action 'terminal' ({len(command)} characters, "
                          f"at most {MAX_COMMAND_CHARS})")
        if "\x00" in command:
            errors.append("Field 'command' must not contain NUL characters for action 'terminal'")
        persistent = payload.get("persistent_session", False)
        if not isinstance(persistent, bool):
            errors.append("Field 'persistent_session' must be true or false for action 'terminal'")
        elif "session" in payload and not persistent:
            errors.append("Field 'session' needs 'persistent_session': true for action 'terminal'")
        timeout = payload.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0 or timeout != timeout):
            errors.append("Field 'timeout' must be a positive number of seconds for action 'terminal'")
        cwd = payload.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.strip() or len(cwd) > MAX_CWD_CHARS
                                or "\x00" in cwd):
            errors.append(f"Field 'cwd' must be a directory path (1 to {MAX_CWD_CHARS} characters) "
                          "for action 'terminal'")
        if not errors:
            errors.extend(policy_errors(command, TerminalSettings.get()))
        return errors

    # ------------------------------------------------------------------ routing (at the ingress)
    def route_action(self, action_type: str, payload: dict, context: dict) -> str | None:
        """A persistent session's commands go to the queue of the node holding (or now claiming) it."""
        if action_type == "terminal" and payload.get("persistent_session") is True:
            node = registry().route(session_of(payload, context))
            return f"terminal.{node}" if node else None
        if action_type == "terminal_close_session":
            entry = registry().entry(session_of(payload, context))
            owner = entry.get("node") if entry else None
            return f"terminal.{owner}" if owner and registry().alive(owner) else None
        return None

    # ------------------------------------------------------------------ running (in a terminal worker)
    def handle_custom_action(self, action_type: str, payload: dict) -> dict:
        """Synchronous on purpose: it waits on processes, in the worker's own thread (threads pool)."""
        ctx = current_action()
        if ctx is None or not get_settings().is_trainer(ctx.interface, ctx.user_id):
            raise NotAuthorized(f"Action '{action_type}' is restricted to trainers")
        node = (ctx.worker or "").rpartition("@")[2] or socket.gethostname()
        if action_type == "terminal_list_sessions":
            return {"sessions": registry().sessions(), "nodes": registry().live_nodes(), "node": node}
        if action_type == "terminal_close_session":
            session = session_of(payload, ctx)
            return {"session": session, "node": node,
                    **self._in_turn(ctx, session, node, lambda: self._node(node).close_session(session))}
        errors = self.validate_payload(action_type, payload)
        if errors:
            raise ValidationError("; ".join(errors), errors)
        return self._terminal(payload, ctx, node, TerminalSettings.get())

    def _node(self, node: str) -> TerminalNode:
        from celery import current_app

        if not _consumes_own_queue(current_app, node):
            raise ValidationError(f"persistent sessions need a terminal node that consumes its own queue "
                                  f"'terminal.{node}' (start it with `rekku worker --pool terminal`)")
        return node_runtime(node)

    def _in_turn(self, ctx: Any, session: str, node: str, work: Any) -> Any:
        """Run ``work`` (a command or close of ``session``) after the earlier commands of the session in
        the same batch: several run at once on a node (threads), and ``cd /tmp`` then ``ls`` must not
        swap. Gives up (not run) if an earlier one makes no progress for TERMINAL_MAX_TIMEOUT + margin."""
        runtime = self._node(node)
        try:
            earlier = _earlier_in_batch(ctx, session)
            if earlier:
                ctx.report_progress("waiting for earlier commands", session=session, node=node)
                patience = TerminalSettings.get().max_timeout + 2 * KILL_GRACE + TIME_MARGIN
                stuck = runtime.await_earlier(earlier, _finished_in_log, patience)
                if stuck:
                    raise HostError(f"not run: the earlier command(s) {', '.join(stuck)} of session '{session}' in "
                                    f"this batch did not finish within {patience:g} s; send it again")
            return work()
        finally:
            runtime.finished(ctx.action_id)

    def _terminal(self, payload: dict, ctx: Any, node: str, settings: TerminalSettings) -> dict:
        command, cwd = payload["command"], payload.get("cwd")
        asked = payload.get("timeout")
        timeout = float(min(asked or settings.default_timeout, settings.max_timeout))
        notes = []
        if asked is not None and asked > settings.max_timeout:
            notes.append(f"timeout capped at {settings.max_timeout:g} s (TERMINAL_MAX_TIMEOUT)")
        persistent = payload.get("persistent_session", False)
        result: dict[str, Any] = {"session": None, "node": node, "persistent_session": persistent,
                                  "timeout": timeout}
        if persistent:
            session = session_of(payload, ctx)
            ctx.report_progress("running", session=session, node=node)
            ran = self._in_turn(ctx, session, node,
                                lambda: self._node(node).session_command(session, command, timeout, cwd))
            outcome = ran["outcome"]
            result.update(session=session, session_lost=ran["session_lost"], new_session=ran["new_session"],
                          ran=ran["ran"], interrupted=outcome.interrupted, session_reset=outcome.session_reset,
                          session_closed=outcome.shell_exited)
        else:
            ctx.report_progress("running", node=node)
            outcome = run_once(command, timeout, Limits.from_settings(settings), cwd)
        notes.extend(outcome.notes)
        return {**outcome.as_dict(), **result, "notice": "; ".join(notes) or None}


PLUGIN_CLASS = TerminalPlugin
