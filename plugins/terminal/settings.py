"""The terminal plugin's variables (TERMINAL_*), read by this package only.

Its own module, so the plugin (``__init__``), the session host and the session registry all import
it without importing each other.
"""

from __future__ import annotations

from pydantic import Field

from rekku.plugin import PluginSettings


class TerminalSettings(PluginSettings):
    """``TerminalSettings.get()``; .env.example documents each variable."""

    #: Longest a terminal command may run, in seconds (a payload's ``timeout`` is capped by it).
    max_timeout: float = Field(300.0, gt=0, validation_alias="TERMINAL_MAX_TIMEOUT")
    #: Timeout of a terminal command whose payload names none, in seconds (capped by the maximum).
    default_timeout: float = Field(60.0, gt=0, validation_alias="TERMINAL_DEFAULT_TIMEOUT")
    #: Bytes of stdout, and again of stderr, a terminal action returns; the rest is counted and dropped.
    max_output: int = Field(65536, ge=256, validation_alias="TERMINAL_MAX_OUTPUT")
    #: Seconds a persistent terminal session may sit idle before its shell is closed.
    session_idle: float = Field(900.0, gt=0, validation_alias="TERMINAL_SESSION_IDLE")
    #: Persistent shells one terminal node keeps at most.
    max_sessions: int = Field(32, ge=1, validation_alias="TERMINAL_MAX_SESSIONS")
    #: Seconds a terminal node counts as alive after its last heartbeat (it beats every third of it).
    node_ttl: float = Field(10.0, ge=1, validation_alias="TERMINAL_NODE_TTL")
    #: Run terminal commands as this (unprivileged) user; the worker must then run as root.
    run_as: str | None = Field(None, validation_alias="TERMINAL_RUN_AS")
    #: Comma-separated programs terminal commands may run (empty: any not denied).
    allow: str = Field("", validation_alias="TERMINAL_ALLOW")
    #: Comma-separated programs terminal commands may not run.
    deny: str = Field("", validation_alias="TERMINAL_DENY")
    #: Limits of every terminal process: CPU seconds, address space in bytes, processes of its user.
    rlimit_cpu: int | None = Field(None, gt=0, validation_alias="TERMINAL_RLIMIT_CPU")
    rlimit_as: int | None = Field(None, gt=0, validation_alias="TERMINAL_RLIMIT_AS")
    rlimit_nproc: int | None = Field(None, gt=0, validation_alias="TERMINAL_RLIMIT_NPROC")
