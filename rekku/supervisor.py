"""`rekku up`: every part on one machine as child processes, and a clean stop on Ctrl-C.

The parts: the ingress, a worker per pool, beat, Flower, and `rekku receive` (Telegram's messages in,
by getUpdates) when TELEGRAM_BOT_TOKEN is set and TELEGRAM_WEBHOOK_SECRET is not.

Each child runs in its own process group with PR_SET_PDEATHSIG, so even a SIGKILL of `rekku up`
leaves no orphan behind. On Ctrl-C or SIGTERM every child's main process gets SIGTERM (Celery's
warm shutdown: running actions finish, held ones go back to the queue), then whatever is left of
each group gets SIGKILL after :data:`STOP_TIMEOUT`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.panel import Panel

from rekku.embedded_redis import EmbeddedRedis, without_password
from rekku.migrate import upgrade
from rekku.pools import POOLS
from rekku.settings import Settings

#: Seconds children get to stop after SIGTERM before they are killed.
STOP_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for children: SIGTERM them when this process dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _spawn(argv: list[str], env: dict[str, str], log_path: str | None = None) -> subprocess.Popen:
    out = None  # owned by the child
    if log_path:  # logs carry payloads and terminal output: the owner's only, whatever the umask
        out = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if out else None,
                            start_new_session=True, preexec_fn=die_with_parent)


@dataclass
class Supervisor:
    settings: Settings
    console: Console = field(default_factory=Console)
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None
    _stopping: bool = False

    def start(self) -> dict[str, str]:
        """Start everything; returns the URLs and credentials to show."""
        home = self.settings.home_dir
        env = dict(os.environ, REKKU_HOME=str(home))
        if self.settings.broker_url:
            broker = without_password(self.settings.broker_url)
        else:
            # The children read the embedded broker's URL (with its password) from REKKU_HOME
            # (Settings.resolved_broker_url): it is on no command line and in no environment.
            self.redis = EmbeddedRedis(home)
            self.redis.start(start_new_session=True, preexec_fn=die_with_parent)
            env.pop("REKKU_BROKER_URL", None)
            broker = f"{self.redis.shown_url}  (embedded)"
        db_url = self.settings.resolved_database_url()
        env["REKKU_DATABASE_URL"] = db_url
        upgrade(db_url)
        token = self.settings.ensure_api_token()
        env["REKKU_API_TOKEN"] = token
        flower_auth = self.settings.ensure_flower_auth()
        env["FLOWER_BASIC_AUTH"] = flower_auth
        logs = home / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        logs.chmod(0o700)
        me = [sys.executable, "-m", "rekku"]
        host, port = self.settings.host, self.settings.port
        plan = {"ingress": me + ["ingress", "--host", host, "--port", str(port), "--no-migrate"]}
        for pool in POOLS:
            plan[f"worker-{pool}"] = me + ["worker", "--pool", pool]
        plan["beat"] = me + ["beat"]
        plan["flower"] = me + ["flower", "--port", str(self.settings.flower_port), "--address", "127.0.0.1"]
        receiving = receives_telegram(self.settings)
        if receiving:
            plan["receive"] = me + ["receive", "--no-migrate"]
        for name, argv in plan.items():
            self.children[name] = _spawn(argv, env, str(logs / f"{name}.log"))
        return {
            "API": f"http://{host}:{port}  (docs: /docs)",
            "Messages": f"http://{host}:{port}/v1/outbox  (what Rekku says through the outbox interface)",
            "Web view": f"http://{host}:{port}/ui  (what happened; log in with the API token)",
            "API token": token,
            "Flower": f"http://127.0.0.1:{self.settings.flower_port}  (user:password = {flower_auth})",
            "Broker": broker,
            "Database": db_url.split("@")[-1] if "@" in db_url else db_url,
            "Logs": str(logs),
            "Telegram": receiving_line(self.settings),
        }

    def watch(self) -> int:
        """Block until Ctrl-C/SIGTERM or a child dies; returns the exit code for `rekku up`."""
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        code = 0
        while not self._stopping:
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    self.console.print(f"[red]{name} exited with code {proc.returncode}; stopping everything "
                                       f"(see {self.settings.home_dir / 'logs' / (name + '.log')})[/red]")
                    self._stopping, code = True, 1
                    break
            time.sleep(0.2)
        self.stop()
        return code

    def _request_stop(self) -> None:
        self._stopping = True

    def stop(self) -> None:
        # SIGTERM to each child's main process only: a Celery worker then finishes the actions it
        # runs and hands back the ones it holds (warm shutdown); its pool processes are its business.
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.children.values():
            signal_group(proc, signal.SIGKILL)  # the group: stray pool children included
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.redis:
            self.redis.stop()


def receives_telegram(settings: Settings) -> bool:
    """`rekku up` runs `rekku receive` (getUpdates) when there is a bot token and no webhook secret:
    Telegram delivers a bot's updates to getUpdates or to a webhook, never both."""
    return bool(settings.telegram_bot_token) and not settings.telegram_webhook_secret


def receiving_line(settings: Settings) -> str:
    if receives_telegram(settings):
        return "receiving messages with getUpdates (`rekku receive`, logs/receive.log)"
    if settings.telegram_bot_token:
        return "webhook mode (TELEGRAM_WEBHOOK_SECRET): updates come to POST /v1/telegram/webhook"
    return "not receiving (TELEGRAM_BOT_TOKEN is not set)"


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a child's whole process group (it was started with start_new_session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_up(settings: Settings) -> int:
    console = Console()
    sup = Supervisor(settings, console)
    try:
        info = sup.start()
    except BaseException:
        sup.stop()
        raise
    lines = "\n".join(f"[bold]{k}:[/bold] {v}" for k, v in info.items())
    console.print(Panel(lines, title="rekku up", subtitle="Ctrl-C stops everything"))
    return sup.watch()
