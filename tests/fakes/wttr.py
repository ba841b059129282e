"""A fake wttr.in on 127.0.0.1: ``GET /<location>?format=j1`` answers wttr.in's j1 JSON.

Set ``temp_c`` (or any field of ``current``) to change the reading, ``fail = True`` to answer 503;
``requests`` lists the paths asked for.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def j1(**current: Any) -> dict:
    """wttr.in's ``?format=j1`` shape (only what matters here), with ``current_condition[0]`` fields."""
    condition = {"FeelsLikeC": "20", "cloudcover": "0", "humidity": "40", "pressure": "1015", "temp_C": "21",
                 "visibility": "10", "weatherCode": "113", "weatherDesc": [{"value": "Clear"}],
                 "winddir16Point": "NW", "windspeedKmph": "7"}
    condition.update(current)
    return {"current_condition": [condition], "nearest_area": [], "weather": []}


class FakeWttr:
    def __init__(self) -> None:
        self.current: dict[str, Any] = {}
        self.fail = False
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                split = urlsplit(self.path)
                fake.requests.append(unquote(split.path))
                if fake.fail:
                    body, status = b"Unknown location; please try ~1.0,1.0", 503
                elif parse_qs(split.query).get("format") != ["j1"]:
                    body, status = b"only ?format=j1 here", 400
                else:
                    body, status = json.dumps(j1(**fake.current)).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeWttr:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
