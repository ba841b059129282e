"""schemathesis against /openapi.json with a valid token: no 5xx, every response matches the schema.

Run as schemathesis' own CLI against the real ingress, at a bounded number of examples per route.
"Schema-valid request rejected" is not checked: a schema-valid action list can still hold an
action that validation rejects (422 with the correction), which is the API doing its job.

The ingress runs with ``REKKU_MAX_WAIT=0.1``: the long polls (``?wait=`` on actions, batches and the
feed) answer within a tenth of a second instead of the five minutes a generated ``wait`` may ask for
(their loop still polls two or three times; the fuzz covers every route, not how long a poll lasts). The feed's
server-sent event stream is left out: it never ends by design (tests/test_conversation.py covers it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support import Stack

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_every_route_answers_within_its_schema_and_never_5xx(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(REKKU_MAX_WAIT="0.1")
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    done = subprocess.run([cli, "run", stack.base_url + "/openapi.json", "-H", f"Authorization: Bearer {stack.token}",
                           "--max-examples", "30", "--checks", CHECKS, "--seed", "1",
                           "--exclude-path", "/v1/feed/stream", "--request-timeout", "30"],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
