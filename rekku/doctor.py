"""`rekku doctor`: each check says what it found and, when something is wrong, what to do.

Levels: ``ok``; ``info`` — not configured, and optional (no Telegram token: its actions are off);
``warn`` — runs, but something is missing (a pool without a worker, a plugin file that failed to load);
``fail`` — broken (the broker or the database cannot be used): `rekku doctor` then exits 1."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from rekku import feed_push
from rekku.celery_app import app
from rekku.embedded_redis import without_password
from rekku.migrate import state
from rekku.pools import POOLS
from rekku.registry import get_registry
from rekku.settings import Settings

#: Where Debian puts the browser and its driver (the selenium pool uses these paths).
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@dataclass
class Check:
    name: str
    level: str  # ok | info | warn | fail
    detail: str
    fix: str = ""


def _signing(settings: Settings) -> Check:
    """Checked first: with signing misconfigured no Rekku process can even load its Celery app."""
    if not settings.signing_enabled:
        return Check("message signing", "ok", "off (REKKU_SIGNING_* turns it on)")
    try:
        from celery.security.certificate import Certificate, FSCertStore
        from celery.security.key import PrivateKey
    except Exception as exc:  # celery.security raises ImproperlyConfigured without cryptography
        return Check("message signing", "fail", f"{type(exc).__name__}: {exc}",
                     "pip install 'rekku-on-celery[signing]' (cryptography)")
    try:
        PrivateKey(Path(settings.signing_key).read_text())  # type: ignore[arg-type]
        cert = Certificate(Path(settings.signing_cert).read_text())  # type: ignore[arg-type]
        FSCertStore(settings.signing_cert_store)[cert.get_id()]
    except Exception as exc:
        return Check("message signing", "fail", f"{type(exc).__name__}: {exc}",
                     "REKKU_SIGNING_KEY and REKKU_SIGNING_CERT must be a PEM key and its unexpired certificate, "
                     "and that certificate must be in REKKU_SIGNING_CERT_STORE on every node")
    return Check("message signing", "ok", f"on: signs as {cert.get_id()}, accepts {settings.signing_cert_store}")


#: What Rekku uses with no REKKU_BROKER_URL and no embedded Redis running (Settings.resolved_broker_url).
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def _broker_source(settings: Settings) -> tuple[str, str]:
    """``(url, where it comes from)``, as :meth:`Settings.resolved_broker_url` resolves it."""
    if settings.broker_url:
        return settings.broker_url, "REKKU_BROKER_URL"
    recorded = settings.home_dir / "embedded-redis.url"
    if recorded.exists():
        return recorded.read_text().strip(), f"the embedded Redis of `rekku up` (recorded in {recorded})"
    return settings.resolved_broker_url(), ""


def _reachable(url: str) -> Exception | None:
    try:
        with app.connection_for_write(url) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return exc
    return None


def _broker(settings: Settings) -> Check:
    """Says which broker URL it checked (without its password) and why that one: never a silent
    fall-back to local Redis."""

    url, source = _broker_source(settings)
    shown = without_password(url)
    error = _reachable(url)
    problem = f": {type(error).__name__}: {error}" if error else ""
    if not source:
        found = f"no broker configured and no embedded Redis running (rekku up); checked {shown}"
        if error:
            return Check("broker", "fail", found + problem,
                         "run `rekku up` (it starts an embedded Redis), or set REKKU_BROKER_URL to your Redis")
        return Check("broker", "warn", found + ": a Redis answers there, and `rekku worker`, `ingress` and `beat` "
                     "started without REKKU_BROKER_URL use it (`rekku up` would start its own instead)",
                     f"set REKKU_BROKER_URL={shown} if that is the broker you mean")
    if error:
        fix = ("is `rekku up` still running? Start it again" if source != "REKKU_BROKER_URL" else
               "start that Redis, or correct REKKU_BROKER_URL")
        return Check("broker", "fail", f"{shown} (from {source}){problem}", fix)
    return Check("broker", "ok", f"{shown} (from {source})")


def _database(settings: Settings) -> Check:

    url = settings.resolved_database_url()
    shown = without_password(url)
    try:
        current, head = state(url)
    except Exception as exc:
        return Check("database", "fail", f"{shown}: {type(exc).__name__}: {exc}",
                     "check REKKU_DATABASE_URL / DB_HOST, DB_USER, DB_PASS, DB_NAME")
    if current == "none":
        return Check("database", "warn", f"{shown}: no Rekku tables yet",
                     "run `rekku migrate` (`rekku up` and `rekku ingress` migrate first)")
    if current != head:
        return Check("database", "fail", f"{shown}: schema at {current}, code expects {head}", "run `rekku migrate`")
    return Check("database", "ok", f"{shown} (schema {current})")


def _model_webhook(settings: Settings) -> Check:
    """The feed's push: off, refused (a URL without its secret: nothing is pushed), or how far it got."""
    reason = feed_push.unavailable_reason(settings)
    if not settings.model_webhook_url:
        return Check("model webhook", "info", "off: the feed is read with GET /v1/feed or the stream",
                     "optional: REKKU_MODEL_WEBHOOK_URL and REKKU_MODEL_WEBHOOK_SECRET push it (.env.example)")
    parts = urlsplit(settings.model_webhook_url)
    target = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # a path may be a token
    if reason is not None:
        return Check("model webhook", "fail", reason,
                     "set REKKU_MODEL_WEBHOOK_SECRET (the receiver checks X-Rekku-Signature with it), "
                     "or unset REKKU_MODEL_WEBHOOK_URL")
    try:
        at = feed_push.cursor()
    except Exception as exc:
        return Check("model webhook", "warn", f"pushing to {target}; cursor unreadable: {type(exc).__name__}",
                     "run `rekku migrate`")
    detail = f"pushing to {target}: acknowledged up to item {at.get('last_id', 0)}"
    if at.get("failing_id") is not None:
        return Check("model webhook", "warn", f"{detail}; item {at['failing_id']} failed {at['attempts']} times: "
                     f"{at.get('last_error')}", "see the io workers' log; it is tried again with backoff")
    return Check("model webhook", "ok", detail)


def _workers() -> list[Check]:
    try:
        replies = app.control.inspect(timeout=1.5).active_queues() or {}
    except Exception as exc:
        return [Check("workers", "fail", f"cannot ask the workers: {exc}", "check the broker first")]
    serving: dict[str, list[str]] = {pool: [] for pool in POOLS}
    for node, queues in replies.items():
        for q in queues or []:
            if q.get("name") in serving:
                serving[q["name"]].append(node)
    return [Check(f"pool {pool}", "ok" if nodes else "warn",
                  ", ".join(sorted(nodes)) if nodes else "no worker online",
                  "" if nodes else f"start one: rekku worker --pool {pool}")
            for pool, nodes in serving.items()]


def _browser() -> Check:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        return Check("browser", "warn", "missing " + ", ".join(missing),
                     "apt-get install chromium chromium-driver (needed by the selenium pool), "
                     "or set SELENIUM_REMOTE_URL")
    return Check("browser", "ok", f"{CHROMIUM}, {CHROMEDRIVER}")


def _plugins() -> list[Check]:

    registry = get_registry()
    checks = [Check("plugins", "ok", f"{len(registry.plugins)} plugins, {len(registry.actions)} actions")]
    checks += [Check("plugin error", "warn", err, "fix or remove the file; the other plugins run")
               for err in registry.errors]
    # Actions whose configuration is missing are off: not configured, not broken. One line per reason.
    reasons: dict[str, list[str]] = {}
    for action_type, spec in sorted(registry.disabled.items()):
        reasons.setdefault(str(spec.disabled), []).append(action_type)
    checks += [Check("not configured", "info", f"{', '.join(types)}: off, {reason}",
                     "optional: set it to turn them on (.env.example)")
               for reason, types in reasons.items()]
    return checks


def run_checks(settings: Settings) -> list[Check]:
    signing = _signing(settings)
    if signing.level == "fail":
        return [signing]
    broker = _broker(settings)
    checks = [signing, broker, _database(settings)]
    if broker.level != "fail":
        checks += _workers()
    return checks + [_model_webhook(settings), _browser()] + _plugins()


def render(checks: list[Check], console: Console) -> None:
    table = Table(title="rekku doctor", header_style="bold")
    for col in ("check", "", "found", "what to do"):
        table.add_column(col)
    marks = {"ok": "[green]ok[/]", "info": "[blue]info[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.level], c.detail, c.fix)
    console.print(table)
    count = {level: sum(c.level == level for c in checks) for level in marks}
    console.print(f"{count['fail']} broken, {count['warn']} warnings, {count['info']} not configured (optional)"
                  + (": fix what is broken first" if count["fail"] else ""))
