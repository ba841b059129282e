"""The `rekku` command (docs/contracts.md §4): starting the parts (up, ingress, worker, beat, flower,
receive, migrate) and the prompt and diary; the commands about actions are in rekku/cli_actions.py."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console

from rekku import cli_actions
from rekku.pools import POOLS
from rekku.settings import describe_invalid, get_settings

console = Console()


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
    if get_settings().log_format == "json":  # every line JSON: no banner, Celery's own prints as records
        from rekku.logs import celery_prints_as_records

        _setup_logging()  # before the app is imported: it may warn about the environment
        celery_prints_as_records()
        argv = ["--quiet", *argv]
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
    port = port or settings.port
    if workers > 1:  # N processes, one set of counters: prometheus-client's multiprocess mode (rekku.metrics)
        from rekku.metrics import use_multiprocess_dir

        use_multiprocess_dir(settings, port)
    from rekku.logs import uvicorn_log_config

    uvicorn.run("rekku.api:create_app", factory=True, host=host or settings.host, port=port,
                workers=workers, log_level=settings.log_level.lower(), access_log=settings.access_log,
                log_config=uvicorn_log_config(settings))


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


# ----------------------------------------------------------------------------- actions (rekku/cli_actions.py)
for _command in cli_actions.COMMANDS:
    main.add_command(_command)


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
