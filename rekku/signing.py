"""Signed messages that cannot be replayed: an id and an expiry inside what is signed.

Celery's ``auth`` serializer signs a message's body only; the task id, ETA and expiry travel in
headers nobody signs. A captured signed ``rekku.ingest`` pushed onto a queue again (with any task id)
therefore verified and ran again. This serializer wraps every body in an envelope
``{"rekku_envelope": {"id", "expires"}, "body": ...}`` before signing, and on receipt refuses a message
without one, or past its expiry. What stops a replay inside the expiry:

* ``rekku.ingest`` without a key of its own uses ``signed:<envelope id>`` as its idempotency key,
  so the same signed request, however often pushed, is accepted once and answered the same after;
* an action message carries its action id, and the action log runs a finished action never again;
* a control message (broadcast to every node) expires after :data:`CONTROL_TTL` seconds and each
  process accepts an envelope id once.

The envelope id reaches the task as ``task.request.rekku_envelope`` (set in the message's ``embed``
part after the signature was checked, never taken from the sender).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from kombu.serialization import registry

from rekku.envelope import ENVELOPE_ATTR

#: Seconds a control message (ping, cancel, shutdown …) stays valid: they are acted on at once.
CONTROL_TTL = 60.0


class EnvelopeSerializer(SecureSerializer):
    """Celery's signed JSON, with an id and an expiry signed together with the body."""

    def __init__(self, *args: Any, ttl: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ttl = ttl
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def serialize(self, data: Any) -> Any:
        ttl = CONTROL_TTL if _is_control(data) else self.ttl
        envelope = {"id": uuid.uuid4().hex, "expires": time.time() + ttl}
        return super().serialize({"rekku_envelope": envelope, "body": data})

    def deserialize(self, data: Any) -> Any:
        wrapped = super().deserialize(data)  # the signature is checked here
        envelope = wrapped.get("rekku_envelope") if isinstance(wrapped, dict) else None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("id"), str) \
                or not isinstance(envelope.get("expires"), (int, float)) or set(wrapped) != {"rekku_envelope", "body"}:
            raise SecurityError("signed message without Rekku's envelope (id and expiry): refused; senders sign "
                                "with rekku.signing.setup_signing (SECURITY.md)")
        now = time.time()
        if envelope["expires"] < now:
            raise SecurityError(f"signed message {envelope['id']} expired {now - envelope['expires']:.0f} s ago: "
                                "refused (a replay, or a sender whose clock is wrong)")
        body = wrapped["body"]
        if _is_control(body):
            self._once(envelope["id"], envelope["expires"], now)
        elif isinstance(body, list) and len(body) == 3 and isinstance(body[2], dict):
            body[2][ENVELOPE_ATTR] = envelope["id"]  # the task message's embed: becomes request.rekku_envelope
        return body

    def _once(self, envelope_id: str, expires: float, now: float) -> None:
        """A control envelope is accepted once per process (each node gets its own copy of a broadcast)."""
        with self._lock:
            if envelope_id in self._seen:
                raise SecurityError(f"signed control message {envelope_id} was already received: a replay, refused")
            self._seen = {k: v for k, v in self._seen.items() if v >= now}
            self._seen[envelope_id] = expires


def _is_control(data: Any) -> bool:
    return isinstance(data, dict) and "method" in data and "arguments" in data


def register(key: str, cert: str, store: str, *, ttl: float, digest: str = "sha256") -> None:
    """Register the envelope serializer as ``auth`` (in place of Celery's), from PEM texts and a store glob."""
    serializer = EnvelopeSerializer(PrivateKey(key), Certificate(cert), FSCertStore(store), digest,
                                    serializer="json", ttl=ttl)
    registry.register("auth", serializer.serialize, serializer.deserialize, content_type="application/data",
                      content_encoding="utf-8")


def setup_signing(app: Any, key_path: str, cert_path: str, store: str, *, ttl: float = 6 * 3600) -> None:
    """Sign what ``app`` sends the way Rekku's nodes expect: for a service that sends ``rekku.ingest``
    from its own Celery app while Rekku runs with ``REKKU_SIGNING_*``."""
    app.conf.update(task_serializer="auth", accept_content=["auth"], security_key=key_path,
                    security_certificate=cert_path, security_cert_store=store, security_digest="sha256")
    app.setup_security(allowed_serializers=["json"], serializer="json")
    with open(key_path) as key, open(cert_path) as cert:
        register(key.read(), cert.read(), store, ttl=ttl)
