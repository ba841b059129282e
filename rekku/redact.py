"""What a task message shows to anyone watching the broker's events (Flower, ``celery events``).

Celery puts ``kwargsrepr`` in every task event; by default it is the payload as sent, so a
password an LLM (or a user) put in an action's payload would sit in Flower's task list for anyone
with Flower credentials. :func:`kwargs_repr` gives the message a representation in which every
value under a secret-looking key is replaced by ``'***'``. The payload itself travels unchanged:
the handler needs it, and the action log keeps it for retries.
"""

from __future__ import annotations

import re
from typing import Any

#: Keys whose values are never shown, matched on the key lowercased without separators ("API-Key",
#: "api_key" and "apiKey" alike): anything naming a password, secret, key or credential, and names
#: ending in "token", "pass" or "pwd" ("access_token", "botToken", "DB_PASS"; not "max_tokens").
SECRET_KEY = re.compile(r"password|passwd|passphrase|secret|apikey|accesskey|privatekey|authorization|cookie"
                        r"|credential|token$|pass$|pwd$")
#: What a hidden value is shown as.
HIDDEN = "***"
#: Longest representation shown (Celery's own default for kwargsrepr).
MAX_REPR = 1024
#: What ends a representation cut at MAX_REPR.
CUT = "..."


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and SECRET_KEY.search(re.sub(r"[^a-z0-9]", "", key.lower())) is not None


def redact(value: Any) -> Any:
    """``value`` with every value under a secret-looking key (at any depth) replaced by ``'***'``."""
    if isinstance(value, dict):
        return {k: HIDDEN if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """The ``kwargsrepr`` of a task message: the kwargs, redacted, cut at :data:`MAX_REPR` characters.

    Python's ``repr``, not Celery's ``saferepr``: a JSON payload holds nothing whose repr could fail or
    recurse, and saferepr, which walks the value in Python, cost a tenth of the ingress's time per
    action (cProfile, 5 actions per request); unlike it, nesting deeper than three levels is shown too."""
    shown = repr(redact(kwargs))
    return shown if len(shown) <= MAX_REPR else shown[:MAX_REPR - len(CUT)] + CUT
