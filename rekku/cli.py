"""The `rekku` command (docs/contracts.md §4): start the parts, submit actions, look at them."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import requests
from rich.console import Console
from rich.live import Live
from rich.table import Table

from rekku.pools import POOLS
from rekku.settings import describe_invalid, get_settings

console = Console()
FINAL = ("succeeded", "failed", "cancelled")
_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "white"}


def _setup_logging() -> None:
    from rekku.logs import setup

    setup(get_settings())


#: The umask of every `rekku` process and so of everything it starts: what Rekku writes (the action
#: log, logs, the broker's data, credentials) is its user's only.
UMASK = 0o077


#: The installed distribution (pyproject.toml's ``name``): ``rekku --version`` reads its version.
DISTRIBUTION = "rekku-on-celery"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"rekku {_version()}")
        ctx.exit()


@click.group()
@click.option("--version", "-V", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the installed version and exit.")
def main() -> None:
    """Rekku actions on Celery."""
    from pydantic import ValidationError

    os.umask(UMASK)
    try:
        settings = get_settings()
    except ValidationError as exc:  # a wrong environment variable: say which, without a traceback
        raise click.ClickException(f"configuration: {describe_invalid(exc)}") from None
    from rekku.logs import redact_secrets

    redact_secrets(settings)  # configured secrets never reach a log line, whoever logs it


# ----------------------------------------------------------------------------- processes
#: Variables Celery's own command line reads without any prefix (celery/bin/celery.py: --app, --broker,
#: --result-backend, --loader, --config, --skip-checks). They are generic names a shell or a platform
#: sets for itself (BROKER_URL!), not Rekku's: its parts take all of that from Settings only.
CELERY_CLI_VARIABLES = ("APP", "BROKER_URL", "RESULT_BACKEND", "LOADER", "CONFIG_MODULE", "SKIP_CHECKS")


def _start_celery(argv: list[str]) -> None:
    """Run a Celery command (worker, beat, flower) of Rekku's app, configured by Settings alone."""
    for name in CELERY_CLI_VARIABLES:
        os.environ.pop(name, None)
    from rekku.celery_app import app

    app.start(argv)


@main.command()
def up() -> None:
    """Everything on this machine: Redis (embedded unless REKKU_BROKER_URL), database, ingress,
    a worker per pool, beat and Flower."""
    from rekku.supervisor import run_up

    sys.exit(run_up(get_settings()))


@main.command()
@click.option("--host", default=None, help="bind address (default REKKU_HOST)")
@click.option("--port", type=int, default=None, help="port (default REKKU_PORT)")
@click.option("--migrate/--no-migrate", default=True, help="run database migrations first")
@click.option("--workers", type=int, default=1, show_default=True, help="uvicorn worker processes")
def ingress(host: str | None, port: int | None, migrate: bool, workers: int) -> None:
    """The HTTP ingress (FastAPI + uvicorn)."""
    import uvicorn

    _setup_logging()
    settings = get_settings()
    if migrate:
        from rekku.migrate import upgrade

        upgrade(settings.resolved_database_url())
    settings.ensure_api_token()
    from rekku.logs import redact_secrets

    redact_secrets(settings)  # again: the token may have been generated just now
    uvicorn.run("rekku.api:create_app", factory=True, host=host or settings.host, port=port or settings.port,
                workers=workers, log_level=settings.log_level.lower(), access_log=False)


@main.command()
@click.option("--migrate/--no-migrate", default=True, help="run database migrations first")
def receive(migrate: bool) -> None:
    """Telegram's messages in: long-polls getUpdates and stores each message once (as POST /v1/messages
    does). Needs TELEGRAM_BOT_TOKEN; not with TELEGRAM_WEBHOOK_SECRET (webhook mode)."""
    settings = get_settings()
    if not settings.telegram_bot_token:
        raise click.ClickException("TELEGRAM_BOT_TOKEN is not set: there is no bot to receive messages for")
    if settings.telegram_webhook_secret:
        raise click.ClickException(
            "TELEGRAM_WEBHOOK_SECRET is set: this deployment receives Telegram's updates through its webhook "
            "(POST /v1/telegram/webhook), and Telegram delivers either to a webhook or to getUpdates, never both. "
            "Unset it (and call Telegram's deleteWebhook) to poll with `rekku receive`.")
    _setup_logging()
    if migrate:
        from rekku.migrate import upgrade

        upgrade(settings.resolved_database_url())
    from rekku.receiver import run_receiver

    sys.exit(run_receiver(settings))


def _node_name(value: str | None) -> str | None:
    """'#' separates a node from its incarnation in the action log and '@' a pool from its node."""
    if value is not None and (not value or set(value) & {"#", "@"} or value != value.strip()):
        raise click.BadParameter("a node name must be non-empty, without '#', '@' or surrounding spaces")
    return value


@main.command()
@click.option("--pool", type=click.Choice(list(POOLS)), required=True)
@click.option("--concurrency", "-c", type=int, default=None, help="processes/threads (default: the pool's)")
@click.option("--node", default=None, callback=lambda _ctx, _param, value: _node_name(value),
              help="node name (default: host name)")
def worker(pool: str, concurrency: int | None, node: str | None) -> None:
    """A Celery worker serving one pool's queue."""
    from rekku.pools import worker_argv

    settings = get_settings()
    argv = worker_argv(pool, concurrency or settings.worker_concurrency, node, settings.log_level)
    _start_celery(argv[2:])


@main.command()
def beat() -> None:
    """celery beat: periodic work (due events, weather, reconciler)."""
    schedule = get_settings().home_dir / "celerybeat-schedule"
    _start_celery(["beat", "-s", str(schedule), "--loglevel", get_settings().log_level])


@main.command()
@click.option("--port", type=int, default=None, help="port (default FLOWER_PORT or 5555)")
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int | None, address: str) -> None:
    """Flower, always behind basic auth (FLOWER_BASIC_AUTH, else generated credentials) on every route
    (/metrics and /healthcheck included), and read-only unless REKKU_FLOWER_CONTROL is set."""
    from rekku.flower_guard import FlowerGuardError, make_read_only, require_auth_everywhere

    settings = get_settings()
    try:
        require_auth_everywhere()
    except FlowerGuardError as exc:
        raise click.ClickException(str(exc)) from exc
    if not settings.flower_control:
        try:
            make_read_only()
        except FlowerGuardError as exc:
            raise click.ClickException(str(exc)) from exc
        console.print("Flower is read-only (REKKU_FLOWER_CONTROL=true lets it revoke tasks and control workers)")
    auth = settings.ensure_flower_auth()
    os.environ["FLOWER_BASIC_AUTH"] = auth  # read by Flower; kept off the command line (ps)
    from rekku.logs import redact_secrets

    redact_secrets(settings)  # the credentials may have been generated just now
    if not settings.flower_basic_auth:
        console.print(f"Flower credentials (generated, in {settings.home_dir / 'flower_auth'}): {auth}")
    _start_celery(["flower", f"--port={port or settings.flower_port}", f"--address={address}"])


@main.command()
def migrate() -> None:
    """Bring the database schema up to date."""
    from rekku.migrate import state, upgrade

    url = get_settings().resolved_database_url()
    upgrade(url)
    current, head = state(url)
    console.print(f"database at revision {current} (head {head})")


# ----------------------------------------------------------------------------- client side
def _client() -> tuple[str, dict[str, str]]:
    """The ingress and token of this machine's settings: the same defaults as rekku.client's."""
    from rekku.client import default_base_url, default_token

    return default_base_url(), {"Authorization": f"Bearer {default_token()}"}


def _problem(resp: requests.Response) -> str:
    """What an error answer of the ingress says: its ``detail`` and ``errors``, or a refused request's
    ``rejected[].errors`` (a 403 has no detail), never ``None``."""
    try:
        answer = resp.json()
    except ValueError:
        return f"{resp.status_code} {resp.reason}: {resp.text.strip()[:300]}".rstrip(": ")
    said: list[str] = []
    if isinstance(answer, dict):
        if answer.get("detail"):
            said.append(str(answer["detail"]))
        for err in answer.get("errors") or []:
            if isinstance(err, dict):
                where = ".".join(str(p) for p in err.get("loc") or [])
                said.append(f"{where}: {err.get('msg', '')}" if where else str(err.get("msg", err)))
            else:
                said.append(str(err))
        for rej in answer.get("rejected") or []:
            said.extend(str(e) for e in rej.get("errors") or [])
    elif answer is not None:
        said.append(json.dumps(answer)[:300])
    return f"{resp.status_code} {resp.reason}: " + ("; ".join(said) if said else "(no details in the answer)")


def _request(method: str, path: str, **kwargs: Any) -> requests.Response:
    base, headers = _client()
    try:
        return requests.request(method, base + path, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)
    except requests.ConnectionError:
        raise click.ClickException(f"cannot reach the ingress at {base} (is `rekku up` or `rekku ingress` running?)")


def _progress_table(runs: list[dict]) -> Table:
    table = Table(show_header=True, header_style="bold")
    for col in ("#", "id", "type", "status", "progress / result"):
        table.add_column(col)
    for i, r in enumerate(runs):
        detail = r.get("error") if r["status"] == "failed" else (
            json.dumps(r.get("result"))[:80] if r["status"] == "succeeded" else
            (r.get("progress") or {}).get("step", ""))
        table.add_row(str(i), r["id"][:8], r["type"], f"[{_STYLE.get(r['status'], '')}]{r['status']}[/]",
                      str(detail or ""))
    return table


@main.command()
@click.argument("file", required=False, default="-")
@click.option("--context", "context_json", default=None, help='JSON, e.g. \'{"chat_id": "1"}\'')
@click.option("--wait", is_flag=True, help="wait until every action is finished, showing progress")
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait at most")
@click.option("--idempotency-key", default=None)
def submit(file: str, context_json: str | None, wait: bool, timeout: float, idempotency_key: str | None) -> None:
    """Submit actions from FILE (or stdin): any JSON form or a raw LLM reply."""
    text = sys.stdin.read() if file == "-" else Path(file).read_text()
    body: dict[str, Any] = {"text": text}
    if context_json:
        try:
            body["context"] = json.loads(context_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--context")
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    resp = _request("POST", "/v1/actions", json=body)
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    # 202 and 422 answer with the batch (accepted and rejected actions); anything else is an error
    # (403: a plugin refused the whole request, its reason in rejected[].errors).
    if resp.status_code not in (202, 422) or not isinstance(answer, dict) or "rejected" not in answer:
        raise click.ClickException(_problem(resp))
    for rej in answer.get("rejected", []):
        which = f"action {rej['index']} ({rej['type']})" if rej.get("index") is not None else "request"
        console.print(f"[red]rejected[/red] {which}: " + "; ".join(rej["errors"]))
    if not answer.get("accepted"):
        sys.exit(2)
    console.print(f"batch {answer['batch_id']}: {len(answer['accepted'])} accepted")
    if not wait:
        for a in answer["accepted"]:
            console.print(f"  {a['id']}  {a['type']}  → {a['queue']}")
        return
    deadline = time.monotonic() + timeout
    runs: list[dict] = []
    with Live(console=console, refresh_per_second=8) as live:
        while time.monotonic() < deadline:
            data = _request("GET", f"/v1/batches/{answer['batch_id']}", params={"wait": 1}, timeout=40).json()
            runs = data["actions"]
            live.update(_progress_table(runs))
            if data["done"]:
                break
    if not runs or any(r["status"] not in FINAL for r in runs):
        raise click.ClickException("timed out waiting for the actions")
    sys.exit(0 if all(r["status"] == "succeeded" for r in runs) and not answer.get("rejected") else 1)


@main.command()
@click.argument("action_id", required=False)
@click.option("--wait", type=float, default=0, help="long-poll up to this many seconds")
@click.option("--stuck", is_flag=True, help="list unfinished actions untouched for longer than REKKU_RECONCILE_GRACE")
def status(action_id: str | None, wait: float, stuck: bool) -> None:
    """One action's state as JSON, or (--stuck) the actions that are not moving."""
    if stuck:
        runs = _stuck_runs()
        table = Table(title=f"{len(runs)} stuck actions", header_style="bold")
        for col in ("id", "type", "status", "queue", "worker", "attempts", "last change"):
            table.add_column(col)
        for r in runs:
            table.add_row(r["id"], r["type"], r["status"], r["queue"], r["worker"] or "", str(r["attempts"]),
                          r["started_at"] or r["created_at"])
        console.print(table)
        sys.exit(1 if runs else 0)
    if not action_id:
        raise click.UsageError("give an ACTION_ID, or --stuck")
    resp = _request("GET", f"/v1/actions/{action_id}", params={"wait": wait}, timeout=wait + 30)
    if resp.status_code != 200:
        raise click.ClickException(_problem(resp))
    console.print_json(data=resp.json())


def _stuck_runs() -> list[dict]:
    """The stuck actions, read from the database; a database without Rekku's tables (never migrated)
    or out of reach is a message saying what to do, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from rekku.embedded_redis import without_password
    from rekku.migrate import state
    from rekku.reconciler import stuck as find_stuck

    settings = get_settings()
    url = settings.resolved_database_url()
    try:
        return find_stuck(settings)
    except SQLAlchemyError as exc:
        shown = without_password(url)
        try:
            current, head = state(url)
        except Exception as inner:
            raise click.ClickException(
                f"cannot read the database {shown}: {type(inner).__name__}: {inner} "
                "(check REKKU_DATABASE_URL, or DB_HOST/DB_USER/DB_PASS/DB_NAME)") from None
        if current != head:
            found = "has no Rekku tables yet" if current == "none" else f"is behind (schema at {current})"
            raise click.ClickException(
                f"the database {shown} {found}: run `rekku migrate` "
                "(`rekku up` and `rekku ingress` migrate it too)") from None
        raise click.ClickException(f"cannot read the action log in {shown}: "
                                   f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}") from None


@main.command()
@click.argument("action_id")
def retry(action_id: str) -> None:
    """Run a failed action again (see GET /v1/dead-letters)."""
    resp = _request("POST", f"/v1/actions/{action_id}/retry")
    if resp.status_code != 200:
        raise click.ClickException(_problem(resp))
    console.print(f"action {action_id} queued again on {resp.json()['queue']}")


@main.command()
def actions() -> None:
    """Every action type this deployment knows, as a table (read from the plugins, not the ingress)."""
    from rekku.registry import get_registry

    registry = get_registry()
    table = Table(title="Rekku actions", header_style="bold")
    for col in ("type", "plugin", "queue", "required", "optional", "description"):
        table.add_column(col)
    for spec in sorted(registry.actions.values(), key=lambda s: s.type):
        table.add_row(spec.type, spec.plugin, spec.pool, ", ".join(spec.required_fields),
                      ", ".join(spec.optional_fields), spec.description)
    for spec in sorted(registry.disabled.values(), key=lambda s: s.type):
        table.add_row(f"[dim]{spec.type}[/dim]", spec.plugin, spec.pool, "", "",
                      f"[yellow]disabled: {spec.disabled}[/]")
    console.print(table)
    for err in registry.errors:
        console.print(f"[red]plugin error:[/red] {err}")


@main.command()
def doctor() -> None:
    """Check broker, database, workers, browser and plugins, and say what to fix."""
    from rekku.doctor import render, run_checks

    checks = run_checks(get_settings())
    render(checks, console)
    sys.exit(1 if any(c.level == "fail" for c in checks) else 0)



# ----------------------------------------------------------------------------- memory and prompt
@main.command()
@click.option("--interface", default=None, help="interface of the chat, e.g. telegram_bot")
@click.option("--chat-id", default=None)
@click.option("--thread-id", default=None)
@click.option("--user-id", default=None)
@click.option("--username", default=None)
@click.option("--text", default="", help="the incoming message")
@click.option("--max-chars", type=click.IntRange(min=1000), default=None,
              help="character budget (default REKKU_PROMPT_MAX_CHARS)")
def prompt(interface: str | None, chat_id: str | None, thread_id: str | None, user_id: str | None,
           username: str | None, text: str, max_chars: int | None) -> None:
    """Print the prompt context for a message, as GET /v1/prompt gives it (built here, no ingress needed)."""
    from rekku.prompt import build_prompt

    body = build_prompt(interface=interface, chat_id=chat_id, thread_id=thread_id, user_id=user_id,
                        username=username, text=text, max_chars=max_chars)
    click.echo(json.dumps(body, ensure_ascii=False, indent=2))
    for name, reason in body["meta"]["skipped_injections"].items():
        click.echo(f"left out: {name}: {reason}", err=True)


@main.group()
def diary() -> None:
    """Rekku's diary (the ai_diary plugin)."""


@diary.command("reset")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def diary_reset(yes: bool) -> None:
    """Delete every diary entry (development; replaces upstream's recreate_diary_table.py)."""
    from rekku.migrate import upgrade
    from rekku.registry import get_registry

    plugin = get_registry().plugins.get("ai_diary")
    if plugin is None:
        raise click.ClickException("the ai_diary plugin is not loaded (see `rekku doctor`)")
    url = get_settings().resolved_database_url()
    if not yes:
        click.confirm(f"Delete every diary entry in {url.split('@')[-1]}?", abort=True)
    upgrade(url)
    console.print(f"diary reset: {plugin.reset()} entries deleted")


if __name__ == "__main__":
    main()
