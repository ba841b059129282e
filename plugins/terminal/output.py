"""Reading a command's output: every pipe drained at once, at most a cap kept, markers found.

Used by plugins/terminal/host.py. Never more than ``cap`` bytes per stream are held in memory, so
10 MB of output costs the same as 64 KiB; decoding replaces invalid UTF-8 instead of dropping it.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from typing import Any

#: Bytes read from a pipe at a time.
CHUNK = 65536


class Capture:
    """Keeps the first and the last bytes of a stream, ``cap`` in all, and counts every byte."""

    def __init__(self, cap: int) -> None:
        self.cap, self.head_cap = cap, cap // 2
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - (self.cap - self.head_cap)
            if excess > 0:
                del self.tail[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        """The kept bytes as UTF-8 (invalid bytes become U+FFFD), the cut said where it is."""
        if not self.truncated:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(self.tail)
        return (self.head.decode("utf-8", "replace")
                + f"\n[... {omitted} bytes omitted: output is capped at {self.cap} bytes (TERMINAL_MAX_OUTPUT), "
                  f"{self.total} bytes in all ...]\n"
                + self.tail.decode("utf-8", "replace"))


class Framer:
    """Feeds one command's stream into a Capture up to its end marker (which never reaches the capture).

    With ``with_code`` the marker is followed by the exit status and a newline (``\\nMARK 0\\n``)."""

    def __init__(self, capture: Capture, marker: str, with_code: bool) -> None:
        self.capture = capture
        self.needle = ("\n" + marker + (" " if with_code else "\n")).encode()
        self.with_code = with_code
        self.pending = b""
        self.rest: bytes | None = None
        self.code: int | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return  # after the marker: output of background jobs, not of this command
        if self.rest is None:
            buf = self.pending + data
            index = buf.find(self.needle)
            if index < 0:
                keep = len(self.needle) - 1
                self.capture.add(buf[:-keep] if len(buf) > keep else b"")
                self.pending = buf[-keep:] if len(buf) > keep else buf
                return
            self.capture.add(buf[:index])
            self.pending, self.rest = b"", buf[index + len(self.needle):]
        else:
            self.rest += data
        if not self.with_code:
            self.done = True
            return
        end = self.rest.find(b"\n")
        if end >= 0:
            try:
                self.code = int(self.rest[:end])
            except ValueError:
                self.code = None
            self.done = True

    def flush(self) -> None:
        """No marker is coming: what is held back is output too."""
        if self.rest is None and self.pending:
            self.capture.add(self.pending)
            self.pending = b""


class Pump:
    """Reads several pipes at once, handing each chunk to that pipe's sink, until a deadline."""

    def __init__(self, sinks: dict[Any, Callable[[bytes], None]]) -> None:
        self.selector = selectors.DefaultSelector()
        for stream, sink in sinks.items():
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream.fileno(), selectors.EVENT_READ, sink)

    @property
    def open(self) -> bool:
        return bool(self.selector.get_map())

    def read(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Read until ``until`` (monotonic), every pipe is at EOF, or ``stop()`` is true."""
        while self.open and not (stop and stop()):
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in self.selector.select(remaining):
                try:
                    data = os.read(key.fd, CHUNK)
                except BlockingIOError:
                    continue
                if data:
                    key.data(data)
                else:
                    self.selector.unregister(key.fd)

    def close(self) -> None:
        self.selector.close()
