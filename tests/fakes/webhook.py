"""A fake receiver of Rekku's signed webhook messages: records them and checks nothing (the tests do)."""

from __future__ import annotations

import itertools
from typing import Any

from tests.fakes.server import FakeServer, Recorded


class FakeWebhookReceiver(FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self.ids = itertools.count(1)
        self.fail_next = 0

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503, {"error": "try later"}, {"Retry-After": "1"}
        return 200, {"id": f"w{next(self.ids)}"}, None
