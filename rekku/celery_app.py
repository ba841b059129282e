"""The Celery application object: bare, configured lazily, importable from anywhere in the core.

Importing this module builds nothing: Celery reads ``rekku.celeryconfig`` on first use, and the signing
setup (when REKKU_SIGNING_* is set) follows it. What only a worker or beat needs — one task per
action type, ``rekku.ingest``, ``rekku.reconcile``, plugins' periodic tasks, the worker's bootsteps
and signal handlers — lives in :mod:`rekku_workers.tasks`, which Celery imports in those processes alone
(``include``). The ingress and the CLI publish by task name (:mod:`rekku.dispatch`) and discover
plugins only to validate, so nothing imports this module for its side effects, and any core module
may import it at the top: it depends on nothing of Rekku but the settings.

``celery -A rekku.celery_app worker -Q <pool>`` works as before (docs/contracts.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery

from rekku.settings import get_settings

#: Variables Celery prefers to its own configuration (celery.app.utils.Settings reads the first four
#: before broker_url/result_backend; CELERY_LOADER picks the loader). A shell that sets them for some
#: other Celery app would silently move Rekku to that broker; only Rekku's documented names configure
#: it (REKKU_BROKER_URL), so its processes drop them, and say so.
CELERY_ENV_OVERRIDES = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL",
                        "CELERY_RESULT_BACKEND", "CELERY_LOADER")
for _name in CELERY_ENV_OVERRIDES:
    if os.environ.pop(_name, None) is not None:
        logging.getLogger(__name__).warning("%s is set in the environment and ignored: Rekku's broker and "
                                            "result backend come from REKKU_BROKER_URL", _name)

#: Modules Celery imports in worker and beat processes: the tasks, bootsteps and signal handlers.
WORKER_MODULES = ("rekku_workers.tasks",)

app = Celery("rekku", include=list(WORKER_MODULES))
app.config_from_object("rekku.celeryconfig")


@app.on_after_configure.connect(weak=False)
def _sign_messages(sender: Celery, **_kwargs: Any) -> None:
    """With signing configured, every process signs what it sends and accepts only signed messages
    (docs/contracts.md); set up as the configuration is first read, before any message moves."""
    settings = get_settings()
    if not settings.signing_enabled:
        return
    from rekku.signing import register  # the optional 'signing' extra (cryptography)

    sender.setup_security(allowed_serializers=["json"], serializer="json")
    register(settings.signing_key.read_text(), settings.signing_cert.read_text(),  # type: ignore[union-attr]
             str(settings.signing_cert_store), ttl=settings.signed_message_ttl)
