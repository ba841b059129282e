"""schemathesis against /openapi.json with a valid token: no 5xx, every response matches the schema.

Run as schemathesis' own CLI against the real ingress, at a bounded number of examples per route.
"Schema-valid request rejected" is not checked: a schema-valid action list can still hold an
action that validation rejects (422 with the correction), which is the API doing its job.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Stack

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_every_route_answers_within_its_schema_and_never_5xx(stack: Stack) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    done = subprocess.run([cli, "run", stack.base_url + "/openapi.json", "-H", f"Authorization: Bearer {stack.token}",
                           "--max-examples", "30", "--checks", CHECKS, "--seed", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
