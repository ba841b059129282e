"""A threaded HTTP server on 127.0.0.1 that records every request; fakes subclass it and answer."""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    #: The JSON body, the form fields (multipart or urlencoded), or {}.
    data: dict[str, Any] = field(default_factory=dict)
    #: Uploaded files: field name → (file name, content) (the last one of a field name).
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    #: Every uploaded file part, in order, whole: (field name, file name, content).
    uploads: list[tuple[str, str, bytes]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)
    #: What the fake answered.
    response: Any = None


def _parse(headers: dict[str, str], raw: bytes) -> tuple[dict[str, Any], list[tuple[str, str, bytes]]]:
    """The body's data and every uploaded file part (field name, file name, content)."""
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/json"):
        return json.loads(raw or b"{}"), []
    if ctype.startswith("application/x-www-form-urlencoded"):
        return {k: v[0] for k, v in parse_qs(raw.decode()).items()}, []
    if ctype.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        data, uploads = {}, []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True) or b""
            if filename is not None:
                uploads.append((name, filename, payload))
            else:
                data[name] = payload.decode(errors="replace")
        return data, uploads
    return {}, []


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The whole request body, Content-Length or chunked (an upload of unknown size is chunked)."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            body += handler.rfile.read(size)
            handler.rfile.readline()  # the CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class _Server(ThreadingHTTPServer):
    """Keeps its open connections, so that stopping the fake closes them too: a client's keep-alive
    connection must not go on being served by a fake that was stopped (it is down)."""

    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.connections_lock:
            open_now, self.connections = list(self.connections), set()
        for connection in open_now:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


class FakeServer:
    """Start with :meth:`start`; ``requests`` holds what arrived, oldest first."""

    def __init__(self, port: int = 0) -> None:
        """``port``: 0 for any free one; a fake started again on its former port takes it back."""
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                raw = _read_body(self)
                split = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                data, uploads = _parse(headers, raw)
                if split.query and self.command == "GET":
                    data = {**{k: v[0] for k, v in parse_qs(split.query).items()}, **data}
                files = {name: (filename, content) for name, filename, content in uploads}
                request = Recorded(self.command, split.path, {k: v[0] for k, v in parse_qs(split.query).items()},
                                   headers, raw, data, files, uploads)
                with fake.lock:
                    fake.requests.append(request)
                status, body, extra = fake.answer(request)
                request.response = body
                encoded = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(encoded)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(encoded)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.drop_connections()

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        return 200, {}, None

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def containing(self, secret: bytes | str) -> list[Recorded]:
        """Requests that carried ``secret`` anywhere in their query, body or uploaded files (a leak check;
        the path is left out because the Bot API's token is in it by design)."""
        needle = secret.encode() if isinstance(secret, str) else secret
        with self.lock:
            found = list(self.requests)
        return [r for r in found if needle in r.raw or any(needle in content for _, _, content in r.uploads)
                or any(needle in f"{k}={v}".encode() for k, v in r.query.items())]

    def received(self, path_suffix: str = "", **data: Any) -> list[Recorded]:
        """Requests whose path ends with ``path_suffix`` and whose data has the given values."""
        with self.lock:
            found = list(self.requests)
        return [r for r in found if r.path.endswith(path_suffix)
                and all(str(r.data.get(k)) == str(v) for k, v in data.items())]
