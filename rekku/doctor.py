"""`rekku doctor`: each check says what it found and, when something is wrong, what to do."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rekku.settings import Settings

#: Where Debian puts the browser and its driver (the selenium pool uses these paths).
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@dataclass
class Check:
    name: str
    level: str  # ok | warn | fail
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


def _broker(settings: Settings) -> Check:
    from rekku.celery_app import app

    url = settings.resolved_broker_url()
    shown = url.split("@")[-1]
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return Check("broker", "ok", shown)
    except Exception as exc:
        return Check("broker", "fail", f"{shown}: {type(exc).__name__}: {exc}",
                     "start Redis or set REKKU_BROKER_URL (rekku up starts an embedded one)")


def _database(settings: Settings) -> Check:
    from rekku.migrate import state

    url = settings.resolved_database_url()
    shown = url.split("@")[-1]
    try:
        current, head = state(url)
    except Exception as exc:
        return Check("database", "fail", f"{shown}: {type(exc).__name__}: {exc}",
                     "check REKKU_DATABASE_URL / DB_HOST, DB_USER, DB_PASS, DB_NAME")
    if current != head:
        return Check("database", "fail", f"{shown}: schema at {current}, code expects {head}", "run `rekku migrate`")
    return Check("database", "ok", f"{shown} (schema {current})")


def _workers() -> list[Check]:
    from rekku.celery_app import app
    from workers.pools import POOLS

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
    from rekku.registry import get_registry

    registry = get_registry()
    checks = [Check("plugins", "ok", f"{len(registry.plugins)} plugins, {len(registry.actions)} actions")]
    checks += [Check("plugin error", "warn", err, "fix or remove the file; the other plugins run")
               for err in registry.errors]
    checks += [Check(f"action {t}", "warn", f"disabled: {s.disabled}", "set the missing configuration")
               for t, s in sorted(registry.disabled.items())]
    return checks


def run_checks(settings: Settings) -> list[Check]:
    signing = _signing(settings)
    if signing.level == "fail":
        return [signing]
    broker = _broker(settings)
    checks = [signing, broker, _database(settings)]
    if broker.level == "ok":
        checks += _workers()
    return checks + [_browser()] + _plugins()


def render(checks: list[Check], console: Console) -> None:
    table = Table(title="rekku doctor", header_style="bold")
    for col in ("check", "", "found", "what to do"):
        table.add_column(col)
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.level], c.detail, c.fix)
    console.print(table)
