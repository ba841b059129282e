"""The `rekku` commands that read and steer actions (docs/contracts.md §4): submit, status, list, cancel,
retry, dead-letters, actions, through the ingress's API; doctor and prune, on this machine's settings.
rekku.cli adds them to the `rekku` group."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import requests
from rich.console import Console
from rich.live import Live
from rich.table import Table

from rekku.settings import get_settings

console = Console()
FINAL = ("succeeded", "failed", "cancelled")
_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "white"}


# ----------------------------------------------------------------------------- talking to the ingress
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


#: ``--json`` of every command that lists something: the machine-readable answer, one JSON document on
#: stdout (for ``list``, ``dead-letters`` and ``cancel`` exactly what the ingress answered).
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="print JSON (machine-readable) instead of a table")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


def _get_json(path: str, params: dict[str, Any]) -> Any:
    """GET ``path`` with the non-empty ``params``; a non-200 answer is the command's error."""
    resp = _request("GET", path, params={k: v for k, v in params.items() if v not in (None, "")})
    if resp.status_code != 200:
        raise click.ClickException(_problem(resp))
    return resp.json()


def _runs_table(runs: list[dict], title: str) -> Table:
    """Actions as ``rekku list`` and ``rekku dead-letters`` show them (the newest first)."""
    table = Table(title=title, header_style="bold")
    for col in ("created (UTC)", "id", "type", "status", "queue", "worker", "attempts"):
        table.add_column(col, no_wrap=True)  # an id is copied from here whole
    table.add_column("error / result", overflow="fold", max_width=60)
    for r in runs:
        detail = r.get("error") if r["status"] in ("failed", "cancelled") else (
            json.dumps(r.get("result"), ensure_ascii=False)[:60] if r["status"] == "succeeded" else "")
        table.add_row((r["created_at"] or "")[:23].replace("T", " "), r["id"], r["type"],
                      f"[{_STYLE.get(r['status'], '')}]{r['status']}[/]", r["queue"], r["worker"] or "",
                      str(r["attempts"]), str(detail or "")[:80])
    return table


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


@click.command()
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


@click.command()
@click.argument("action_id", required=False)
@click.option("--wait", type=float, default=0, help="long-poll up to this many seconds")
@click.option("--stuck", is_flag=True, help="list unfinished actions untouched for longer than REKKU_RECONCILE_GRACE")
@JSON_OPTION
def status(action_id: str | None, wait: float, stuck: bool, as_json: bool) -> None:
    """One action's state as JSON, or (--stuck) the actions that are not moving."""
    if stuck:
        runs = _stuck_runs()
        if as_json:
            _echo_json({"actions": runs})
            sys.exit(1 if runs else 0)
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
    if as_json:
        _echo_json(resp.json())
    else:
        console.print_json(data=resp.json())


def _stuck_runs() -> list[dict]:
    """The stuck actions, read from the database; a database without Rekku's tables (never migrated)
    or out of reach is a message saying what to do, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from rekku.reconciler import stuck as find_stuck

    settings = get_settings()
    try:
        return find_stuck(settings)
    except SQLAlchemyError as exc:
        raise _database_problem(settings.resolved_database_url(), exc) from None


def _database_problem(url: str, exc: Exception) -> click.ClickException:
    """What to do about a database error: reach it, migrate it, or the error itself."""
    from rekku.embedded_redis import without_password
    from rekku.migrate import state

    shown = without_password(url)
    try:
        current, head = state(url)
    except Exception as inner:
        return click.ClickException(
            f"cannot read the database {shown}: {type(inner).__name__}: {inner} "
            "(check REKKU_DATABASE_URL, or DB_HOST/DB_USER/DB_PASS/DB_NAME)")
    if current != head:
        found = "has no Rekku tables yet" if current == "none" else f"is behind (schema at {current})"
        return click.ClickException(
            f"the database {shown} {found}: run `rekku migrate` "
            "(`rekku up` and `rekku ingress` migrate it too)")
    return click.ClickException(f"cannot read the action log in {shown}: "
                                f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}")


@click.command()
@click.option("--dry-run", is_flag=True, help="count what would go; delete nothing")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def prune(dry_run: bool, as_json: bool) -> None:
    """Delete rows and artifacts past their retention (REKKU_RETAIN_*), in small transactions."""
    from contextlib import nullcontext

    import redis as redis_lib
    from sqlalchemy.exc import SQLAlchemyError

    from rekku import retention
    from rekku.embedded_redis import without_password

    settings = get_settings()
    try:
        # a dry run deletes nothing, so it needs no lock (nor a broker)
        with nullcontext() if dry_run else retention.holding_lock(settings) as lock:
            report = retention.prune(settings, dry_run=dry_run, lock=lock)
    except retention.Busy as exc:
        raise click.ClickException(f"{exc}; try again when it is over") from None
    except redis_lib.RedisError as exc:
        raise click.ClickException(
            f"cannot take the pruning lock on the broker {without_password(settings.resolved_broker_url())}: "
            f"{type(exc).__name__} (check REKKU_BROKER_URL; `rekku prune --dry-run` needs no broker)") from None
    except SQLAlchemyError as exc:
        raise _database_problem(settings.resolved_database_url(), exc) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    table = Table(title="Rekku retention" + (" (dry run: nothing deleted)" if dry_run else ""), header_style="bold")
    for col in ("kind", "kept for", "older than", verb, "still needed"):
        table.add_column(col, justify="right" if col in (verb, "still needed") else "left", no_wrap=True)
    for tally in report.kinds:
        table.add_row(tally.kind, f"{tally.days:g} days" if tally.days else "forever",
                      tally.cutoff.strftime("%Y-%m-%d") if tally.cutoff else "-",
                      str(tally.count), str(tally.kept))
    console.print(table)
    console.print(f"{report.total} rows and files {'would be deleted' if dry_run else 'deleted'}; "
                  f"{report.batches} batches in {report.seconds:.1f} s, "
                  f"the longest {report.longest_batch * 1000:.0f} ms")


@click.command()
@click.argument("action_id")
def retry(action_id: str) -> None:
    """Run a failed action again (see GET /v1/dead-letters)."""
    resp = _request("POST", f"/v1/actions/{action_id}/retry")
    if resp.status_code != 200:
        raise click.ClickException(_problem(resp))
    console.print(f"action {action_id} queued again on {resp.json()['queue']}")


@click.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]), default=None)
@click.option("--type", "action_type", default=None, help="only this action type")
@click.option("--chat-id", default=None, help="only actions asked from this chat")
@click.option("--batch-id", default=None, help="only this request's actions")
@click.option("--since", default=None, help="created at or after (ISO 8601, UTC without a zone)")
@click.option("--until", default=None, help="created before (ISO 8601, UTC without a zone)")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--cursor", default=None, help="the next_cursor a previous page printed")
@JSON_OPTION
def list_actions(status: str | None, action_type: str | None, chat_id: str | None, batch_id: str | None,
                 since: str | None, until: str | None, limit: int, cursor: str | None, as_json: bool) -> None:
    """Actions, newest first, as GET /v1/actions lists them (one page; --cursor for the next)."""
    page = _get_json("/v1/actions", {"status": status, "type": action_type, "chat_id": chat_id,
                                     "batch_id": batch_id, "since": since, "until": until, "limit": limit,
                                     "cursor": cursor})
    if as_json:
        _echo_json(page)
        return
    console.print(_runs_table(page["actions"], f"{len(page['actions'])} actions, newest first"))
    if page["next_cursor"]:
        console.print(f"older ones: rekku list --cursor {page['next_cursor']} (with the same filters)")


@click.command()
@click.argument("action_id")
@JSON_OPTION
def cancel(action_id: str, as_json: bool) -> None:
    """Cancel a queued action, or ask a running one to stop (exit 1 when it is already finished)."""
    resp = _request("POST", f"/v1/actions/{action_id}/cancel")
    if resp.status_code != 200:
        raise click.ClickException(_problem(resp))
    if as_json:
        _echo_json(resp.json())
    else:
        console.print(f"action {action_id}: {resp.json()['detail']}")


@click.command("dead-letters")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--before", default=None, help="an action id: the failed actions older than it")
@JSON_OPTION
def dead_letters(limit: int, before: str | None, as_json: bool) -> None:
    """Actions that failed for good, newest first (GET /v1/dead-letters); `rekku retry ID` runs one again."""
    page = _get_json("/v1/dead-letters", {"limit": limit, "before": before})
    if as_json:
        _echo_json(page)
        return
    console.print(_runs_table(page["actions"], f"{len(page['actions'])} dead letters (failed for good)"))


@click.command()
@JSON_OPTION
def actions(as_json: bool) -> None:
    """Every action type this deployment knows, as a table (read from the plugins, not the ingress)."""
    from rekku.registry import get_registry

    registry = get_registry()
    if as_json:
        _echo_json({"actions": [{"type": s.type, "plugin": s.plugin, "queue": s.pool,
                                 "required_fields": list(s.required_fields), "optional_fields": list(s.optional_fields),
                                 "description": s.description}
                                for s in sorted(registry.actions.values(), key=lambda s: s.type)],
                    "disabled": {s.type: s.disabled for s in sorted(registry.disabled.values(), key=lambda s: s.type)},
                    "errors": list(registry.errors)})
        return
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


@click.command()
@JSON_OPTION
def doctor(as_json: bool) -> None:
    """Check broker, database, workers, browser and plugins, and say what to fix."""
    from rekku.doctor import render, run_checks

    checks = run_checks(get_settings())
    if as_json:
        _echo_json({"checks": [{"name": c.name, "level": c.level, "detail": c.detail, "fix": c.fix} for c in checks]})
    else:
        render(checks, console)
    sys.exit(1 if any(c.level == "fail" for c in checks) else 0)


#: Every command of this module, in the order `rekku --help` lists them.
COMMANDS = (submit, status, prune, retry, list_actions, cancel, dead_letters, actions, doctor)
