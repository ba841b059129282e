"""Optional message signing (REKKU_SIGNING_*, Celery's ``auth`` serializer) with real certificates:
signed actions run; an unsigned message, and one signed by a key whose certificate is not in the
store, are refused and logged, never executed."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu import Connection

from tests.conftest import running_stack
from tests.support import Stack, twice, wait_until


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """A private key and its self-signed certificate, as PEM files in ``folder``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def signed(tmp_home: Path) -> Iterator[Stack]:
    home = tmp_home / "signed"
    home.mkdir()
    key, cert = make_identity(home / "node", "rekku-node")
    store = home / "store"
    store.mkdir()
    (store / "rekku-node.pem").write_bytes(cert.read_bytes())
    env = {"REKKU_SIGNING_KEY": str(key), "REKKU_SIGNING_CERT": str(cert),
           "REKKU_SIGNING_CERT_STORE": str(store / "*.pem")}
    with running_stack("signed", home, "sqlite", env, [("default", 2, "signed-main")]) as stack:
        yield stack


def _worker_log(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in (stack.home / "logs").glob("worker-default-*.log"))


def _publish(stack: Stack, body: bytes | str, content_type: str, action_id: str) -> None:
    with Connection(stack.broker_url) as conn:
        conn.Producer().publish(
            body, routing_key="default", serializer=None, content_type=content_type, content_encoding="utf-8",
            headers={"task": "rekku.action.tk_sleep", "id": action_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""})


def test_signed_actions_run_and_the_messages_on_the_queue_are_signed(signed: Stack) -> None:
    import base64
    import json

    import redis

    run = signed.run("echo", {"text": "signed"})
    assert run["status"] == "succeeded" and run["result"] == {"text": "signed"}
    # an io action waits on its queue (this stack has no io worker): look at the message as sent
    answer = signed.submit([{"type": "tk_io", "payload": {"password": "hunter2"}}])
    action_id = answer["accepted"][0]["id"]
    client = redis.Redis.from_url(signed.broker_url)
    raw = wait_until(lambda: client.lrange("io", 0, -1), timeout=10, what="the io message")
    message = next(m for m in map(json.loads, raw) if m["headers"]["id"] == action_id)
    client.delete("io")  # nobody consumes it; the stack goes away with this module
    assert message["content-type"] == "application/data"  # Celery's auth serializer
    signed_body = base64.b64decode(message["body"]) if message["properties"]["body_encoding"] == "base64" \
        else message["body"].encode()
    fields = base64.b64decode(signed_body).split(b"\x00\x01")  # signer, signature, type, encoding, body
    assert len(fields) == 5 and fields[2] == b"application/json" and fields[1]
    signed_part = json.loads(fields[4])  # the body inside an envelope whose id and expiry are signed too
    envelope = signed_part["rekku_envelope"]
    assert set(envelope) == {"id", "expires"} and envelope["expires"] > time.time()
    assert signed_part["body"][1]["action_id"] == action_id
    assert message["headers"]["kwargsrepr"].count("hunter2") == 0  # what Flower would show is redacted


def test_an_unsigned_json_message_is_refused_and_logged(signed: Stack) -> None:
    import json

    action_id = str(uuid.uuid4())
    body = json.dumps([[], {"action_id": action_id, "payload": {"seconds": 0}, "context": {}}, {}])
    _publish(signed, body, "application/json", action_id)
    wait_until(lambda: "untrusted content" in _worker_log(signed) or "ContentDisallowed" in _worker_log(signed),
               timeout=20, what="the refusal of the unsigned message in the log")
    wait_until(twice(lambda: signed.consumed(action_id)), what="the refused message to be dropped, not requeued")
    assert signed.journal(action_id) == []
    assert signed.run("echo")["status"] == "succeeded"


def test_a_message_signed_by_a_key_not_in_the_store_is_refused(signed: Stack, tmp_path: Path) -> None:
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    key, cert = make_identity(tmp_path / "rogue", "rogue")
    rogue = SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()),
                             FSCertStore(str(tmp_path / "rogue" / "*.pem")), digest="sha256", serializer="json")
    action_id = str(uuid.uuid4())
    before = _worker_log(signed).count("Unknown certificate")
    _publish(signed, rogue.serialize([[], {"action_id": action_id, "payload": {"seconds": 0}, "context": {}}, {}]),
             "application/data", action_id)
    wait_until(lambda: _worker_log(signed).count("Unknown certificate") > before, timeout=20,
               what="the refusal of the rogue signature in the log")
    wait_until(twice(lambda: signed.consumed(action_id)), what="the refused message to be dropped, not requeued")
    assert signed.journal(action_id) == []
    assert signed.run("echo")["status"] == "succeeded"


def test_doctor_checks_the_signing_identity_and_pings_signed_workers(signed: Stack, tmp_path: Path) -> None:
    from tests.test_cli import rekku

    done = rekku(signed, "doctor")
    assert "message signing" in done.stdout and "on: signs as" in done.stdout and "rekku-node" in done.stdout
    assert "default@signed-main" in done.stdout  # the ping went through: doctor's control messages are signed
    empty = tmp_path / "empty-store"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "rekku", "doctor"], capture_output=True, text=True, timeout=60,
                          env=signed.env(REKKU_SIGNING_CERT_STORE=str(empty / "*.pem"), COLUMNS="200"))
    assert done.returncode != 0 and "message signing" in done.stdout and "FAIL" in done.stdout
    assert "Unknown certificate" in done.stdout
    partial = subprocess.run([sys.executable, "-m", "rekku", "doctor"], capture_output=True, text=True, timeout=60,
                             env={**signed.env(), "REKKU_SIGNING_CERT": ""})
    assert partial.returncode == 1 and "REKKU_SIGNING_KEY, REKKU_SIGNING_CERT and REKKU_SIGNING_CERT_STORE" in \
        partial.stderr and "Traceback" not in partial.stderr


def _signed_app(stack: Stack) -> Celery:
    from rekku.signing import setup_signing

    app = Celery("replayer", broker=stack.broker_url)
    setup_signing(app, stack.extra_env["REKKU_SIGNING_KEY"], stack.extra_env["REKKU_SIGNING_CERT"],
                  stack.extra_env["REKKU_SIGNING_CERT_STORE"])
    return app


def _runs_with(stack: Stack, marker: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as c:
            return c.scalar(sa.text("SELECT count(*) FROM action_runs WHERE payload LIKE :m"), {"m": f"%{marker}%"})
    finally:
        engine.dispose()


def test_a_captured_signed_ingest_pushed_again_runs_once(signed: Stack) -> None:
    """The attack: copy a signed rekku.ingest off the queue and push it back, under new task ids."""
    import json

    import redis

    marker = f"replay-{uuid.uuid4().hex[:8]}"
    app = _signed_app(signed)
    try:
        app.send_task("rekku.ingest", kwargs={"body": {"actions": [{"type": "echo", "payload": {"text": marker}}]}},
                      queue="captured")
    finally:
        app.close()
    client = redis.Redis.from_url(signed.broker_url)
    raw = wait_until(lambda: client.lrange("captured", 0, -1), timeout=10, what="the captured message")[0]
    client.delete("captured")
    pushed = []
    for _ in range(3):  # the original and two replays, each under a task id of the attacker's choosing
        message = json.loads(raw)
        message["headers"]["id"] = message["properties"]["correlation_id"] = str(uuid.uuid4())
        pushed.append(message["headers"]["id"])
        message["properties"]["delivery_tag"] = str(uuid.uuid4())
        message["properties"]["delivery_info"] = {"exchange": "", "routing_key": "default"}
        client.lpush("default", json.dumps(message))
    wait_until(lambda: _runs_with(signed, marker) >= 1, timeout=20, what="the signed request's action")
    # every one of the three taken and acknowledged (after its run: the ingest acknowledges late)
    wait_until(twice(lambda: signed.consumed(*pushed)), timeout=20, what="the replays to be consumed")
    assert _runs_with(signed, marker) == 1


def test_signed_messages_without_an_envelope_or_past_their_expiry_are_refused(signed: Stack) -> None:
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    from rekku.signing import EnvelopeSerializer

    env = signed.extra_env
    parts = (PrivateKey(Path(env["REKKU_SIGNING_KEY"]).read_text()), Certificate(Path(env["REKKU_SIGNING_CERT"])
             .read_text()), FSCertStore(env["REKKU_SIGNING_CERT_STORE"]))
    bare = SecureSerializer(*parts, digest="sha256", serializer="json")  # Celery's own: no id, no expiry
    stale = EnvelopeSerializer(*parts, digest="sha256", serializer="json", ttl=-1)  # expired when sent
    for serializer, refusal in ((bare, "without Rekku's envelope"), (stale, "expired")):
        action_id = str(uuid.uuid4())
        before = _worker_log(signed).count(refusal)
        _publish(signed, serializer.serialize([[], {"action_id": action_id, "payload": {"seconds": 0},
                                                    "context": {}}, {}]), "application/data", action_id)
        wait_until(lambda r=refusal, b=before: _worker_log(signed).count(r) > b, timeout=20,
                   what=f"the refusal ({refusal}) in the log")
        wait_until(twice(lambda a=action_id: signed.consumed(a)), what="the refused message to be dropped")
        assert signed.journal(action_id) == []
    assert signed.run("echo")["status"] == "succeeded"
