"""The terminal session host in-process: capture, framing, timeouts, sessions, limits, command policy,
and the session registry on a real Redis.

Real processes (bash, sleep, head), no worker: these are the fast checks under tests/test_terminal.py.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import pytest
import redis
from rekku_plugins.terminal import _programs, policy_errors
from rekku_plugins.terminal.host import Limits, SessionHost, Shell, run_once
from rekku_plugins.terminal.output import Capture, Framer
from rekku_plugins.terminal.sessions import SessionRegistry
from rekku_plugins.terminal.settings import TerminalSettings

from tests.support import REDIS_HOST, REDIS_PORT, claim_redis_db, gone, release_redis_db, wait_until

LIMITS = Limits(max_output=4096)


@pytest.fixture
def shell() -> Shell:
    shell = Shell("test", LIMITS)
    yield shell
    shell.close()


# ----------------------------------------------------------------------------- output
def test_capture_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    capture = Capture(100)
    for _ in range(100):
        capture.add(b"0123456789")
    text = capture.text()
    assert capture.truncated and capture.total == 1000
    assert text.startswith("0123456789" * 5) and text.endswith("0123456789" * 5)
    assert "900 bytes omitted" in text and "capped at 100 bytes" in text


def test_framer_finds_a_marker_split_across_chunks_and_keeps_what_came_before() -> None:
    capture = Capture(1000)
    framer = Framer(capture, "MARK", with_code=True)
    stream = b"line one\nno newline\nMARK 42\nbackground noise"
    for i in range(len(stream)):
        framer.feed(stream[i:i + 1])
    assert framer.done and framer.code == 42
    assert capture.text() == "line one\nno newline"


def test_one_off_separates_stdout_stderr_and_exit_code() -> None:
    outcome = run_once("echo out; echo err >&2; exit 3", 5, LIMITS)
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == ("out\n", "err\n", 3)
    assert not outcome.timed_out and not outcome.truncated


def test_one_off_binary_and_invalid_utf8_output_is_replaced_not_dropped() -> None:
    outcome = run_once(r"printf 'ok\377\376end\000\n'; printf 'caf\303\251 \200' >&2", 5, LIMITS)
    assert outcome.stdout == "ok\ufffd\ufffdend\x00\n"
    assert outcome.stderr == "café \ufffd"


def test_one_off_ten_megabytes_are_read_to_the_end_and_capped() -> None:
    outcome = run_once("head -c 10000000 /dev/zero | tr '\\0' x", 20, LIMITS)
    # read to the end: had the reading stopped at the cap, the writer would block on the full pipe and
    # the command would time out instead of ending on its own
    assert not outcome.timed_out and outcome.exit_code == 0
    assert outcome.truncated
    assert len(outcome.stdout) < 4096 + 200 and "10000000 bytes in all" in outcome.stdout


def test_one_off_that_ignores_sigterm_is_killed_with_its_group(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    outcome = run_once(f"trap '' TERM; sleep 30 & echo $! > {pid}; sleep 30; echo never", 0.5, LIMITS)
    assert outcome.timed_out and outcome.exit_code is None and outcome.signal == "SIGKILL"
    assert "ignored SIGTERM" in outcome.notes[0] and "never" not in outcome.stdout
    # its background process, in its group, was killed with it (SIGKILLed, it may take a moment to end)
    wait_until(lambda: gone(int(pid.read_text())), timeout=10, what="the background sleep to be killed")


def test_one_off_background_leftovers_do_not_hold_the_answer(tmp_path: Path) -> None:
    pid, late = tmp_path / "pid", tmp_path / "late"
    outcome = run_once(f"(sleep 30; touch {late}) & echo $! > {pid}; echo started", 5, LIMITS)
    assert outcome.stdout == "started\n" and outcome.exit_code == 0 and not outcome.timed_out
    assert "background" in outcome.notes[0]
    # answered without waiting for the leftover (it holds stdout open, and would have touched "late"
    # had it been waited for): it was killed instead (SIGKILLed, it may take a moment to end)
    assert not late.exists()
    wait_until(lambda: gone(int(pid.read_text())), timeout=10, what="the leftover to be killed")
    assert not late.exists()


def test_one_off_environment_does_not_leak_worker_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKKU_API_TOKEN", "s3cret")
    assert "s3cret" not in run_once("env", 5, LIMITS).stdout


def test_one_off_runs_as_the_configured_user_with_limits() -> None:
    nobody = pwd.getpwnam("nobody")
    limits = Limits(max_output=4096, run_as="nobody", cpu_seconds=7, processes=50)
    outcome = run_once("id -u; ulimit -t; ulimit -u", 5, limits, cwd="/tmp")
    assert outcome.stdout.split() == [str(nobody.pw_uid), "7", "50"], outcome
    shell = Shell("limited", limits)
    try:
        assert shell.run("id -u; ulimit -t; ulimit -t 100", 5).stdout.split() == [str(nobody.pw_uid), "7"]
        assert shell.run("ulimit -t", 5).stdout == "7\n"  # the command could not raise its limit
    finally:
        shell.close()


# ----------------------------------------------------------------------------- persistent shells
def test_session_keeps_directory_variables_and_background_jobs(shell: Shell) -> None:
    assert shell.run("cd /tmp; export GREETING=hi; sleep 30 &", 5).exit_code == 0
    outcome = shell.run("pwd; echo $GREETING; jobs | wc -l; false", 5)
    assert outcome.stdout == "/tmp\nhi\n1\n" and outcome.exit_code == 1


def test_session_output_without_final_newline_and_stdin_is_not_the_shell(shell: Shell) -> None:
    assert shell.run("printf 'no newline'", 5).stdout == "no newline"
    assert shell.run("cat; echo after", 5).stdout == "after\n"  # cat reads /dev/null, not our commands


def test_session_timed_out_command_is_interrupted_and_state_kept(shell: Shell) -> None:
    shell.run("cd /tmp", 5)
    outcome = shell.run("trap '' INT TERM; sleep 30", 0.5)
    assert outcome.timed_out and outcome.interrupted and not outcome.session_reset
    assert "SIGKILL" in outcome.notes[0]
    assert shell.run("pwd", 5).stdout == "/tmp\n"


def test_session_stuck_in_a_builtin_loop_is_reset(shell: Shell) -> None:
    outcome = shell.run("while :; do :; done", 0.5)
    assert outcome.timed_out and outcome.session_reset and not shell.alive
    assert "replaced by a fresh one" in outcome.notes[0]


def test_session_exit_closes_the_session(shell: Shell) -> None:
    outcome = shell.run("exit 7", 5)
    assert outcome.shell_exited and outcome.exit_code == 7 and not shell.alive


def test_host_reaps_idle_sessions_but_not_busy_ones() -> None:
    host = SessionHost(max_sessions=2)
    idle, busy = host.open("idle", LIMITS), host.open("busy", LIMITS)
    with host.lock("busy"):
        time.sleep(0.2)
        closed = host.reap(0.1)
    assert closed == [idle] and not idle.alive and busy.alive
    assert host.names() == ["busy"]
    host.shutdown()
    assert not busy.alive


def test_host_refuses_more_sessions_than_its_limit() -> None:
    host = SessionHost(max_sessions=1)
    host.open("one", LIMITS)
    try:
        with pytest.raises(Exception, match="TERMINAL_MAX_SESSIONS"):
            host.open("two", LIMITS)
    finally:
        host.shutdown()


# ----------------------------------------------------------------------------- command policy
def test_program_words_are_found_in_pipelines_substitutions_and_compound_commands() -> None:
    assert _programs("cd /tmp && FOO=1 /bin/rm -rf x; echo $(whoami) | grep a") == ["cd", "rm", "echo", "whoami",
                                                                                     "grep"]
    assert _programs("for f in *; do cat $f; done") == ["cat"]
    assert _programs("echo 'unbalanced") is None


def test_allow_and_deny_lists_refuse_other_programs() -> None:
    allow = TerminalSettings(_env_file=None, allow="ls,echo")
    assert policy_errors("ls -l | echo", allow) == []
    assert "(rm)" in policy_errors("ls; rm -rf /", allow)[0]
    deny = TerminalSettings(_env_file=None, deny="rm,shutdown")
    assert policy_errors("ls", deny) == [] and "(shutdown)" in policy_errors("echo x && shutdown", deny)[0]
    assert "could not be parsed" in policy_errors("echo 'x", deny)[0]
    assert policy_errors("echo 'x", TerminalSettings(_env_file=None)) == []


def test_worker_process_is_not_the_shells_process_group() -> None:
    shell = Shell("group", LIMITS)
    try:
        assert os.getpgid(shell.proc.pid) == shell.proc.pid != os.getpgid(0)
    finally:
        shell.close()


# ----------------------------------------------------------------------------- session registry (real Redis)
@pytest.fixture
def registry() -> SessionRegistry:
    number = claim_redis_db()
    yield SessionRegistry(redis.Redis(REDIS_HOST, REDIS_PORT, db=number), node_ttl=5, session_ttl=60)
    release_redis_db(number)


def test_registry_never_takes_a_session_from_a_live_node(registry: SessionRegistry) -> None:
    registry.beat("a", 0)
    registry.beat("b", 0)
    assert registry.claim("s", "a") == "a"
    registry.bind("s", "a", "shell-1")
    assert registry.claim("s", "b") == "a" and registry.route("s") == "a"


def test_registry_moves_a_dead_nodes_session_and_remembers_it_was_lost(registry: SessionRegistry) -> None:
    registry.beat("a", 0)
    registry.claim("s", "a")
    registry.claim("reserved-only", "a")
    registry.bind("s", "a", "shell-1")
    registry.forget_node("a")
    registry.beat("b", 0)
    assert registry.route("s") == "b" and registry.entry("s")["lost_from"] == "a"
    assert registry.route("reserved-only") == "b" and "lost_from" not in registry.entry("reserved-only")
    registry.bind("s", "b", "shell-2")
    assert "lost_from" not in registry.entry("s")
    assert not registry.release("s", "shell-1") and registry.release("s", "shell-2") and registry.entry("s") is None


def test_registry_routes_new_sessions_to_the_least_busy_live_node(registry: SessionRegistry) -> None:
    assert registry.route("s") is None  # no terminal node alive: the shared queue
    registry.beat("busy", 5)
    registry.beat("idle", 1)
    assert registry.route("s") == "idle"
    assert set(registry.live_nodes()) == {"busy", "idle"}
    assert [(e["session"], e["node"], e["node_alive"], e["open"]) for e in registry.sessions()] == [
        ("s", "idle", True, False)]
