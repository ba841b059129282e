"""A fake text-to-speech site built to docs/plugins.md §3's selectors, on 127.0.0.1, for real Chromium.

``/app/speech-synthesis/text-to-speech`` redirects to ``/login`` without a session cookie; the login
form (``name=email``, ``name=password``, a "Sign in" button) shows ``role=alert`` on a wrong password.
The editor page has ``textarea[data-testid='tts-editor']``, a "Generate speech" button that turns into
``button[aria-label='Loading'][data-loading='true']`` while ``POST /api/generate`` waits
``generate_delay`` seconds, then a Download button that fetches a small valid MP3 as an attachment,
and "N credits remaining". Knobs: ``never_finish`` (generation never answers), ``stall_download``
(the download sends a few bytes and stalls), ``hang_page`` (the page's script spins forever).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PAGE = "/app/speech-synthesis/text-to-speech"

#: One silent MPEG-1 Layer III frame (128 kbit/s, 44.1 kHz, 417 bytes).
FRAME = b"\xff\xfb\x90\x64" + bytes(413)
MP3 = FRAME * 8

LOGIN_HTML = """<!doctype html><html><body><h1>Sign in</h1>{error}
<form method="post" action="/login"><input name="email" type="email"><input name="password" type="password">
<button type="submit">Sign in</button></form></body></html>"""

EDITOR_HTML = """<!doctype html><html><body>
<div id="onboarding"><button onclick="this.parentNode.remove()">Skip</button></div>
<textarea data-testid="tts-editor"></textarea>
<div id="controls"><button aria-label="Generate speech" id="generate">Generate speech</button></div>
<p id="credits">{credits} credits remaining</p>
<script>
const hang = {hang};
document.getElementById('generate').onclick = async () => {{
  const text = document.querySelector("textarea[data-testid='tts-editor']").value;
  const controls = document.getElementById('controls');
  controls.innerHTML = '<button aria-label="Loading" data-loading="true" disabled>Loading</button>';
  if (hang) {{ while (true) {{}} }}
  const resp = await fetch('/api/generate', {{method: 'POST', body: JSON.stringify({{text}}),
                                              headers: {{'Content-Type': 'application/json'}}}});
  const body = await resp.json();
  controls.innerHTML = '<button aria-label="Download" id="download">Download</button>';
  document.getElementById('credits').textContent = body.credits + ' credits remaining';
  document.getElementById('download').onclick = () => {{ window.location.href = '/download/' + body.id; }};
}};
</script></body></html>"""


class FakeTTSSite:
    def __init__(self, email: str = "rekku@example.org", password: str = "s3cret") -> None:
        self.email, self.password = email, password
        self.credits = 10_000
        self.generate_delay = 0.3
        self.never_finish = False
        self.stall_download = False
        self.hang_page = False
        self.sessions: set[str] = set()
        self.generated: list[str] = []
        self.logins = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "text/html", **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def _session(self) -> str | None:
                for part in (self.headers.get("Cookie") or "").split(";"):
                    key, _, value = part.strip().partition("=")
                    if key == "session" and value in fake.sessions:
                        return value
                return None

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == PAGE:
                    if not self._session():
                        self._send(302, b"", Location="/login?next=" + PAGE)
                        return
                    page = EDITOR_HTML.format(credits=fake.credits, hang="true" if fake.hang_page else "false")
                    self._send(200, page.encode())
                elif path == "/login":
                    self._send(200, LOGIN_HTML.format(error="").encode())
                elif path.startswith("/download/"):
                    if fake.stall_download:
                        self.send_response(200)
                        self.send_header("Content-Type", "audio/mpeg")
                        self.send_header("Content-Disposition", 'attachment; filename="speech.mp3"')
                        self.send_header("Content-Length", str(len(MP3)))
                        self.end_headers()
                        self.wfile.write(MP3[:100])
                        self.wfile.flush()
                        fake.stop_event.wait(120)
                        return
                    self._send(200, MP3, "audio/mpeg", Content_Disposition='attachment; filename="speech.mp3"')
                else:
                    self._send(404, b"not found")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                if path == "/login":
                    form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                    if form.get("email") == fake.email and form.get("password") == fake.password:
                        token = secrets.token_hex(8)
                        with fake.lock:
                            fake.sessions.add(token)
                            fake.logins += 1
                        self._send(302, b"", Location=PAGE, Set_Cookie=f"session={token}; Path=/")
                    else:
                        error = '<div role="alert">Wrong email or password</div>'
                        self._send(200, LOGIN_HTML.format(error=error).encode())
                elif path == "/api/generate":
                    text = json.loads(raw or b"{}").get("text", "")
                    if fake.never_finish:
                        fake.stop_event.wait(120)
                        return
                    time.sleep(fake.generate_delay)
                    with fake.lock:
                        fake.generated.append(text)
                        fake.credits -= len(text)
                        body = {"id": secrets.token_hex(6), "credits": fake.credits}
                    self._send(200, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeTTSSite:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def reset(self) -> None:
        self.generate_delay, self.never_finish, self.stall_download, self.hang_page = 0.3, False, False, False
        self.stop_event.set()
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
