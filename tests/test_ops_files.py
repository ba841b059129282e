"""The deployment files agree with the code they deploy.

docker-compose.yml, the Dockerfile, .dockerignore and .env.example name CLI commands, options, pools
and environment variables that live in rekku/cli.py (and cli_actions.py), rekku/pools.py and rekku/settings.py; a rename
on one side must fail here, not at `docker compose up`. Nothing is built and no container starts; the
healthcheck commands alone are run for real, against a real worker, beat and Flower (the last section).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from rekku.cli import main as rekku_cli
from rekku.pools import POOLS
from rekku.settings import Settings
from tests.support import (
    Stack,
    claim_redis_db,
    free_port,
    rekku_variables,
    release_redis_db,
    settings_classes,
    stop_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent

#: Services of docker-compose.yml that are not Rekku processes.
INFRA_SERVICES = frozenset({"redis", "mariadb"})
#: The Rekku services (roles): deploy/k8s/ has the same ones (tests/test_k8s.py).
ROLES = frozenset({"migrate", "ingress", "beat", "flower", "receive"} | {f"worker-{p}" for p in POOLS})

#: Variables read by interfaces and pool resources themselves rather than by a settings class (the
#: core's Settings or a plugin's settings_class). Each is still listed in .env.example. When one
#: becomes a settings field, it may stay here or be dropped; either way .env.example must keep it.
RESERVED_PLUGIN_VARIABLES = frozenset({
    # --- listed in docs/contracts.md §6
    "TELEGRAM_BOT_TOKEN",       # telegram_bot interface
    "TELEGRAM_API_URL",         # telegram_bot interface: Bot API base URL
    "DISCORD_WEBHOOK_URL",      # discord_bot interface
})

#: Variables only docker-compose.yml reads (for its own services), listed in .env.example all the same.
COMPOSE_ONLY_VARIABLES = frozenset({"REDIS_PASSWORD"})

_ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
_INTERPOLATION = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


# ----------------------------------------------------------------------------- readers
@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def rekku_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if name not in INFRA_SERVICES}


@cache
def env_example() -> dict[str, dict[str, Any]]:
    """name -> {"active": uncommented?, "comment": the line above, "count": times listed}."""
    entries: dict[str, dict[str, Any]] = {}
    previous = ""
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            name = match.group(2)
            entry = entries.setdefault(name, {"active": False, "comment": "", "count": 0})
            entry["count"] += 1
            entry["active"] |= match.group(1) is None
            # The explanation is the comment line right above (not another commented-out variable).
            if previous.startswith("#") and not _ENV_LINE.match(previous) and len(previous.lstrip("# ")) > 3:
                entry["comment"] = previous
        previous = line.strip()
    return entries


def settings_variables() -> set[str]:
    """The documented names of every field of the core's Settings and of the bundled plugins' settings."""
    names: set[str] = set()
    for field in (field for cls in settings_classes() for field in cls.model_fields.values()):
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None:
            names.update(c for c in getattr(alias, "choices", []) if isinstance(c, str))
    return names


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    # The image's ENTRYPOINT is `rekku`; tolerate a command that spells it out too.
    return argv[1:] if argv and argv[0] == "rekku" else argv


def resolve_invocation(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse argv exactly as `rekku ...` would, without running anything; (sub-command, its params).

    Unknown sub-commands, unknown options, bad choices and bad types raise click errors.
    """
    ctx = rekku_cli.make_context("rekku", list(argv))
    command: click.Command = rekku_cli
    path = []
    while isinstance(command, click.Group):
        # Click < 8.2: protected_args; 8.2+: _protected_args (deprecated alias); 9: everything in args.
        protected = vars(ctx).get("_protected_args") or vars(ctx).get("protected_args") or []
        remaining = [*protected, *ctx.args]
        assert remaining, f"`rekku {' '.join(argv)}` names no sub-command"
        name, command, rest = command.resolve_command(ctx, remaining)
        assert command is not None, f"`rekku {' '.join(argv)}`: no such command"
        path.append(name)
        ctx = command.make_context(name, rest, parent=ctx)
    assert not ctx.args, f"`rekku {' '.join(argv)}`: unexpected arguments {ctx.args}"
    return " ".join(path), ctx.params


def container_ports(service: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(host ip or None, container port) of each published port, short or long syntax."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append((entry.get("host_ip"), int(entry["target"])))
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else None
        result.append((host_ip, int(parts[-1].split("/")[0])))
    return result


def environment_keys(service: dict[str, Any]) -> set[str]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return set(env)
    return {item.split("=", 1)[0] for item in env}


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


# ----------------------------------------------------------------------------- compose: the one image
def test_every_rekku_service_runs_the_one_image_built_from_the_repository() -> None:
    rekku = rekku_services()
    assert set(rekku) == ROLES
    images = {svc.get("image") for svc in rekku.values()}
    builds = {str(svc.get("build")) for svc in rekku.values()}
    assert len(images) == 1 and None not in images, f"one image name for every Rekku service, got {images}"
    assert builds == {"."}, f"every Rekku service builds the repository's Dockerfile, got {builds}"
    for name, svc in rekku.items():
        assert svc.get("entrypoint") in (None, "rekku", ["rekku"]), f"{name} replaces the rekku entrypoint"


def test_image_entrypoint_is_the_rekku_console_script() -> None:
    entrypoints = [rest for kw, rest in dockerfile_instructions() if kw == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["rekku"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rekku"] == "rekku.cli:main"


def test_every_compose_command_is_a_valid_rekku_invocation() -> None:
    for name, svc in rekku_services().items():
        argv = command_argv(svc)
        try:
            resolve_invocation(argv)
        except click.ClickException as exc:  # UsageError, NoSuchOption, BadParameter...
            pytest.fail(f"service {name}: `rekku {' '.join(argv)}` is not a valid invocation: {exc.format_message()}")


def test_the_command_parser_check_rejects_typos() -> None:
    """The check above really parses: a wrong sub-command, option or pool is an error."""
    for argv in (["wroker", "--pool", "io"], ["worker", "--pol", "io"], ["worker", "--pool", "gpu"],
                 ["ingress", "--port", "eighty"]):
        with pytest.raises(click.ClickException):
            resolve_invocation(argv)


def test_one_worker_service_per_pool_each_naming_its_pool() -> None:
    invocations = {name: resolve_invocation(command_argv(svc)) for name, svc in rekku_services().items()}
    workers = {name: params["pool"] for name, (command, params) in invocations.items() if command == "worker"}
    assert sorted(workers.values()) == sorted(POOLS), f"one worker service per pool of POOLS, got {workers}"
    for name, pool in workers.items():
        assert name == f"worker-{pool}", f"service {name} serves pool {pool!r}"


def test_the_other_services_run_migrate_ingress_beat_and_flower() -> None:
    assert resolve_invocation(command_argv(services()["migrate"]))[0] == "migrate"
    assert resolve_invocation(command_argv(services()["ingress"]))[0] == "ingress"
    assert resolve_invocation(command_argv(services()["beat"]))[0] == "beat"
    assert resolve_invocation(command_argv(services()["flower"]))[0] == "flower"
    assert resolve_invocation(command_argv(services()["receive"]))[0] == "receive"
    for name in ("ingress", "receive"):
        assert not resolve_invocation(command_argv(services()[name]))[1]["migrate"], \
            f"{name} migrates again: the migrate service has done it"


def test_migrate_is_a_one_shot_that_every_other_rekku_service_waits_for() -> None:
    migrate = services()["migrate"]
    assert migrate.get("restart") == "no", "a one-shot: restarted, it would run forever"
    assert migrate["depends_on"]["mariadb"]["condition"] == "service_healthy"
    for name in rekku_services().keys() - {"migrate"}:
        deps = services()[name].get("depends_on") or {}
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", \
            f"{name} starts before the schema is at head"


def test_the_telegram_receiver_runs_only_when_asked_for() -> None:
    """`rekku receive` needs TELEGRAM_BOT_TOKEN and must not run beside a webhook: like `rekku up`, which
    starts it only with a token, compose starts it only with its profile."""
    svc = services()["receive"]
    assert svc.get("profiles") == ["telegram"]
    assert not svc.get("ports")
    comment = (ROOT / "docker-compose.yml").read_text().split("\n  receive:")[0].rsplit("\n\n", 1)[-1]
    assert "TELEGRAM_BOT_TOKEN" in comment and "TELEGRAM_WEBHOOK_SECRET" in comment and "--profile telegram" in comment


# ----------------------------------------------------------------------------- compose: network
def test_published_ports_are_the_ports_the_commands_listen_on() -> None:
    for name, option in (("ingress", "host"), ("flower", "address")):
        svc = services()[name]
        params = resolve_invocation(command_argv(svc))[1]
        assert params[option] == "0.0.0.0", f"{name} must listen on all container interfaces to be published"
        assert [port for _, port in container_ports(svc)] == [params["port"]]


def test_flower_is_published_on_loopback_only() -> None:
    ports = container_ports(services()["flower"])
    assert ports and all(host == "127.0.0.1" for host, _ in ports), ports
    for name, svc in services().items():
        if name not in ("ingress", "flower"):
            assert not svc.get("ports"), f"{name} publishes ports; only the ingress and Flower should"


def test_redis_and_mariadb_use_official_images() -> None:
    for name, repo in (("redis", "redis"), ("mariadb", "mariadb")):
        image = services()[name]["image"]
        bare = image.removeprefix("docker.io/").removeprefix("library/")
        assert bare.split(":")[0] == repo, f"{name} should use the official `{repo}` image, got {image}"
        assert "build" not in services()[name]


def test_redis_keeps_an_append_only_file_and_mariadb_speaks_utf8mb4() -> None:
    redis_cmd = " ".join(command_argv(services()["redis"]))
    assert "--appendonly yes" in redis_cmd
    assert services()["redis"].get("volumes"), "the append-only file needs a volume"
    mariadb_cmd = " ".join(command_argv(services()["mariadb"]))
    assert "--character-set-server=utf8mb4" in mariadb_cmd
    assert "--collation-server=utf8mb4_" in mariadb_cmd


def test_services_start_only_after_what_they_need_is_healthy() -> None:
    def healthy_deps(name: str) -> set[str]:
        deps = services()[name].get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        return {d for d, spec in deps.items() if spec.get("condition") == "service_healthy"}

    for name in rekku_services().keys() - {"migrate"}:
        assert "redis" in healthy_deps(name), name
        if roles_secrets()[name] & {"DB_PASS"}:
            assert "mariadb" in healthy_deps(name), name
    assert healthy_deps("migrate") == {"mariadb"}
    for name in services():
        for dep in healthy_deps(name):
            assert services()[dep].get("healthcheck", {}).get("test"), f"{name} waits on {dep}'s missing healthcheck"


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, svc in services().items():
        if name == "migrate":  # a one-shot: its health is its exit status, which the others wait on
            assert "healthcheck" not in svc
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        if test[0] == "CMD" and test[1] == "python":
            compile(test[3], f"<{name} healthcheck>", "exec")


def test_worker_healthchecks_ping_the_node_name_rekku_worker_uses() -> None:
    from rekku.pools import worker_argv

    for pool in POOLS:
        argv = worker_argv(pool, node="NODE")
        assert argv[argv.index("-n") + 1] == f"{pool}@NODE"
        test = services()[f"worker-{pool}"]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        # compose turns $$ into $: the container's shell expands its own HOSTNAME, the worker's default node
        command = shlex.split(test[1].replace("$$", "$"))
        assert command[:5] == ["celery", "-A", "rekku.celery_app", "inspect", "ping"], command
        assert command[command.index("--destination") + 1] == f"{pool}@$HOSTNAME"


def test_ingress_healthcheck_polls_healthz_without_curl(tmp_path: Path) -> None:
    svc = services()["ingress"]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "the image has no curl: the check is Python's urllib"
    code = test[3]
    compile(code, "<healthcheck>", "exec")
    port = resolve_invocation(command_argv(svc))[1]["port"]
    assert f"127.0.0.1:{port}/healthz" in code

    from rekku.api import create_app

    app = create_app(Settings(api_token="t", home=tmp_path))
    assert "/healthz" in {getattr(route, "path", None) for route in app.routes}


def test_selenium_worker_has_shared_memory_for_chromium() -> None:
    assert str(services()["worker-selenium"].get("shm_size", "")).lower() in ("1gb", "1g", "1024m")


def test_every_rekku_service_shares_the_artifacts_volume() -> None:
    for name, svc in rekku_services().items():
        targets = {str(v).split(":")[1] if isinstance(v, str) else v["target"] for v in svc.get("volumes", [])}
        assert "/artifacts" in targets, name
    assert "artifacts" in compose()["volumes"]


# ----------------------------------------------------------------------------- secrets per role
#: The variables that hold a secret (a URL may hold a password or, for Discord, a token). Deployments give
#: each role only those it needs: compose blanks the others (docker-compose.yml), Kubernetes splits them
#: into Secrets (deploy/k8s/secrets.yaml).
SECRETS = frozenset({
    "REKKU_BROKER_URL", "REKKU_DATABASE_URL", "DB_PASS", "REKKU_API_TOKEN", "FLOWER_BASIC_AUTH",
    "REKKU_LLM_API_KEY", "TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET", "REKKU_MODEL_WEBHOOK_SECRET",
    "DISCORD_BOT_TOKEN", "DISCORD_WEBHOOK_URLS", "DISCORD_WEBHOOK_URL", "REKKU_WEBHOOK_SECRET",
    "REDDIT_CLIENT_SECRET", "REDDIT_PASSWORD", "ELEVENLABS_PASSWORD",
    # a Sentinel group's own password: no role of docker-compose.yml or deploy/k8s/ has one (their broker
    # is a plain Redis URL); a Sentinel deployment gives it wherever it gives REKKU_BROKER_URL
    "REKKU_SENTINEL_PASSWORD",
    # compose's own Redis password: only the redis service holds it; every Rekku service gets it inside
    # REKKU_BROKER_URL, with the variable itself blanked
    "REDIS_PASSWORD",
})
_SECRET_NAME = re.compile(r"TOKEN|PASS|SECRET|API_KEY|BASIC_AUTH|DISCORD_WEBHOOK_URL")
#: What the plugins and interfaces that send hold. The ingress needs them too: it refuses an action whose
#: plugin is not configured, and tells that from the credentials (rekku.plugin_base.build_spec).
SENDERS = frozenset({"TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "DISCORD_WEBHOOK_URLS", "DISCORD_WEBHOOK_URL",
                     "REKKU_WEBHOOK_SECRET", "REDDIT_CLIENT_SECRET", "REDDIT_PASSWORD", "ELEVENLABS_PASSWORD",
                     "REKKU_MODEL_WEBHOOK_SECRET"})
#: The secrets each role gets (README "Deploying" says why); deploy/k8s/ gives the same.
ROLE_SECRETS: dict[str, frozenset[str]] = {
    "migrate": frozenset({"DB_PASS"}),
    "ingress": frozenset({"REKKU_BROKER_URL", "DB_PASS", "REKKU_API_TOKEN", "TELEGRAM_WEBHOOK_SECRET"}) | SENDERS,
    **{f"worker-{pool}": frozenset({"REKKU_BROKER_URL", "DB_PASS", "REKKU_LLM_API_KEY"}) | SENDERS for pool in POOLS},
    "beat": frozenset({"REKKU_BROKER_URL"}),
    "flower": frozenset({"REKKU_BROKER_URL", "FLOWER_BASIC_AUTH"}),
    "receive": frozenset({"REKKU_BROKER_URL", "DB_PASS", "TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET",
                          "REKKU_MODEL_WEBHOOK_SECRET"}),
}
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def container_env(name: str, dotenv: dict[str, str]) -> dict[str, str]:
    """The environment compose gives service ``name`` when ``.env`` holds ``dotenv``: the env_file, then
    ``environment`` over it (a name without a value is passed when .env holds it), interpolated."""
    svc = services()[name]
    env = dict(dotenv) if svc.get("env_file") == ".env" else {}
    assert svc.get("env_file") in (None, ".env"), f"{name}: env_file {svc.get('env_file')!r}"
    for key, value in (svc.get("environment") or {}).items():
        if value is None:
            if key in dotenv:
                env[key] = dotenv[key]
            else:
                env.pop(key, None)
        else:
            env[key] = _REFERENCE.sub(lambda m: dotenv.get(m.group(1)) or (m.group(2) or ""), str(value))
    return env


def every_secret_set() -> dict[str, str]:
    """A .env holding a valid value for every secret (and the example's other values)."""
    dotenv = {name: "" for name in env_example()}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            dotenv[match.group(2)] = match.group(3)
    for name in SECRETS:
        dotenv[name] = dotenv.get(name) or "secret-value-0123456789"
    dotenv["FLOWER_BASIC_AUTH"] = "rekku:secret-value"
    dotenv["REKKU_DATABASE_URL"] = "mysql+mysqldb://rekku:secret@db:3306/rekku"
    return dotenv


@cache
def roles_secrets() -> dict[str, frozenset[str]]:
    """The secrets each Rekku service of docker-compose.yml ends up with (a non-empty value) when .env
    holds every one."""
    dotenv = every_secret_set()
    return {name: frozenset(k for k, v in container_env(name, dotenv).items() if k in SECRETS and v)
            for name in rekku_services()}


def test_every_variable_that_looks_secret_is_classified() -> None:
    looks_secret = {name for name in rekku_variables() | set(env_example()) if _SECRET_NAME.search(name)}
    assert looks_secret <= SECRETS, f"classify as secrets (and give to the roles that need them): " \
                                    f"{sorted(looks_secret - SECRETS)}"
    assert SECRETS <= set(env_example()), sorted(SECRETS - set(env_example()))


def test_each_compose_service_gets_only_the_secrets_its_role_needs() -> None:
    assert set(ROLE_SECRETS) == ROLES
    for name, got in roles_secrets().items():
        assert got == ROLE_SECRETS[name], (f"{name}: extra {sorted(got - ROLE_SECRETS[name])}, "
                                           f"missing {sorted(ROLE_SECRETS[name] - got)}")


def test_compose_s_redis_requires_a_password_that_every_rekku_service_s_broker_url_holds() -> None:
    redis_service = services()["redis"]
    assert "--requirepass" in " ".join(command_argv(redis_service))
    assert redis_service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert "REDISCLI_AUTH" in " ".join(redis_service["healthcheck"]["test"])
    dotenv = every_secret_set()
    for name in rekku_services():
        url = container_env(name, dotenv).get("REKKU_BROKER_URL")
        if url is not None:
            assert url == f"redis://:{dotenv['REDIS_PASSWORD']}@redis:6379/0", (name, url)


def test_flower_has_no_database_password_nor_api_token() -> None:
    flower = services()["flower"]
    assert "env_file" not in flower, "Flower reads no .env: it would get every secret there"
    keys = environment_keys(flower)
    assert not keys & {"DB_PASS", "REKKU_API_TOKEN", "REKKU_DATABASE_URL", "DB_HOST"}, keys
    assert {"REKKU_BROKER_URL", "FLOWER_BASIC_AUTH"} <= keys


def test_the_settings_read_each_role_s_environment_without_the_secrets_it_was_not_given(tmp_path: Path) -> None:
    """What a container holds is a configuration the core's and the plugins' settings accept, and a blanked
    secret reads as unset there (not as an empty password)."""
    from pydantic import AliasChoices

    dotenv = every_secret_set()
    for name in sorted(rekku_services()):
        env_file = tmp_path / f"{name}.env"
        env = container_env(name, dotenv)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k in rekku_variables()))
        for cls in settings_classes():
            settings = cls(_env_file=env_file)
            for field_name, spec in cls.model_fields.items():
                alias = spec.validation_alias
                names = alias.choices if isinstance(alias, AliasChoices) else [alias]
                secret = next((n for n in names if n in SECRETS), None)
                if secret is None or secret in ("REKKU_BROKER_URL", "REKKU_DATABASE_URL"):
                    continue
                value = getattr(settings, field_name)
                value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
                given = secret in ROLE_SECRETS[name]
                assert bool(value) == given, f"{name}: {secret} is {'missing' if given else 'there'}"


# ----------------------------------------------------------------------------- environment
def compose_variables() -> set[str]:
    """Environment keys of the Rekku services and every ${VAR} interpolated anywhere in the file."""
    names = set().union(*(environment_keys(svc) for svc in rekku_services().values()))
    for line in (ROOT / "docker-compose.yml").read_text().splitlines():
        if not line.lstrip().startswith("#"):
            names.update(a or b for a, b in _INTERPOLATION.findall(line))
    return names


def test_every_compose_variable_is_listed_in_env_example() -> None:
    missing = compose_variables() - set(env_example())
    assert not missing, f"docker-compose.yml uses variables .env.example does not list: {sorted(missing)}"


def test_variables_compose_requires_are_uncommented_in_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
    assert required, "compose should refuse to start without its secrets"
    inactive = {name for name in required if not env_example()[name]["active"]}
    assert not inactive, f"required by docker-compose.yml, but commented out in .env.example: {sorted(inactive)}"


def test_every_env_example_variable_is_a_setting_or_a_reserved_plugin_variable() -> None:
    unknown = set(env_example()) - settings_variables() - RESERVED_PLUGIN_VARIABLES - COMPOSE_ONLY_VARIABLES
    assert COMPOSE_ONLY_VARIABLES <= compose_variables()
    assert not unknown, (f".env.example lists variables nothing reads: {sorted(unknown)}; add a Settings "
                         "field (rekku/settings.py) or reserve it for a plugin in this test")


def test_env_example_lists_every_setting_and_every_reserved_plugin_variable() -> None:
    missing = (settings_variables() | RESERVED_PLUGIN_VARIABLES) - set(env_example())
    assert not missing, f".env.example does not list: {sorted(missing)}"


def test_every_env_example_variable_is_listed_once_with_a_comment() -> None:
    for name, entry in env_example().items():
        assert entry["count"] == 1, f"{name} is listed {entry['count']} times"
        assert entry["comment"], f"{name} has no explanatory comment on the line above"


def test_env_example_settings_values_are_valid(tmp_path: Path) -> None:
    """The example, uncommented as a whole, is a configuration the core's Settings and every bundled
    plugin's settings accept."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match and match.group(2) in settings_variables():
            lines.append(f"{match.group(2)}={match.group(3)}")
    env_file = tmp_path / "example.env"
    env_file.write_text("\n".join(lines) + "\n")
    for cls in settings_classes():
        cls(_env_file=env_file)


# ----------------------------------------------------------------------------- Dockerfile and build context
def test_image_is_slim_bookworm_non_root_with_rekku_home_on_a_volume() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
             for kw, rest in instructions if kw == "FROM"]
    assert bases[-1] == "python:3.11-slim-bookworm", bases
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "REKKU_HOME=/data" in env and "REKKU_ARTIFACT_DIR=/artifacts" in env
    volumes = " ".join(rest for kw, rest in instructions if kw == "VOLUME")
    assert "/data" in volumes
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert '".[mariadb,selenium,reddit]"' in runs
    for package in ("default-libmysqlclient-dev", "build-essential", "pkg-config", "chromium", "chromium-driver"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", runs), f"{package} is not installed"


def _dockerignore_rule(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _dockerignore_rule(line.lstrip("!").strip("/"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, rule in rules:
        if any(rule.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_build_context_holds_the_sources_and_keeps_secrets_out() -> None:
    for secret in (".env", ".git/config", ".venv/bin/python", ".rekku/api_token", "tests/conftest.py",
                   "rekku/__pycache__/cli.cpython-311.pyc", "plugins/.env"):
        assert dockerignored(secret), f"{secret} would be sent into the image build"
    copied = []
    for kw, rest in dockerfile_instructions():
        if kw == "COPY" and "--from" not in rest:
            copied += rest.split()[:-1]
    assert copied
    for source in copied:
        root = ROOT / source
        files = [root] if root.is_file() else [
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert not dockerignored(rel), f"{rel} is needed by the Dockerfile but excluded by .dockerignore"


def _tracked_texts() -> dict[str, str]:
    """Every text file git tracks (and the new ones it does not ignore), by path."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    texts = {}
    for name in filter(None, listed):
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yml", ".toml", ".example", ".cfg", ".txt", ".sh"} or \
                name in {"Makefile", "Dockerfile"}:
            try:
                texts[name] = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
    return texts


def test_the_repository_cites_only_documents_it_holds() -> None:
    """The contracts live in docs/ and SECURITY.md; nothing may send a reader to the team's notes
    outside the repository (DESIGN.md, UPSTREAM.md, seed/plugins.rst, ../shared)."""
    outside = re.compile(r"DESIGN\.md|UPSTREAM\.md|seed/plugins\.rst|\.\./shared")
    found = [f"{name}: {m.group(0)}" for name, text in _tracked_texts().items()
             if name != "tests/test_ops_files.py" for m in outside.finditer(text)]
    assert not found, found
    cited = {m.group(0) for text in _tracked_texts().values()
             for m in re.finditer(r"docs/[a-z_-]+\.md|SECURITY\.md", text)}
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert cited and not missing, missing


# ----------------------------------------------------------------------------- healthchecks, run for real
@pytest.fixture
def live(tmp_path: Path) -> Iterator[Stack]:
    """A migrated SQLite database and a Redis db of its own; the test starts the processes it checks."""
    number = claim_redis_db()
    stack = Stack("health", tmp_path, f"sqlite:///{tmp_path / 'rekku.db'}", number)
    try:
        assert stack.spawn("migrate", log_name="migrate").wait(timeout=120) == 0
        yield stack
    finally:
        stack.stop()
        release_redis_db(number)


def run_healthcheck(service: str, env: dict[str, str], port: int | None = None) -> int:
    """Run ``service``'s healthcheck command as the container would (the image's python and celery are this
    environment's); ``port``, if given, replaces the service's port in it. Its exit status."""
    test = services()[service]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        command = test[1].replace("$$", "$")
        command = re.sub(r"^celery ", f"{shlex.quote(sys.executable)} -m celery ", command)
        argv = ["/bin/sh", "-c", command]
    else:
        argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
    if port is not None:
        published = container_ports(services()[service])[0][1]
        argv = [a.replace(f":{published}/", f":{port}/") for a in argv]
    return subprocess.run(argv, env=env, cwd=str(ROOT), capture_output=True, timeout=60).returncode


def test_worker_healthcheck_answers_for_its_own_pool_s_node_only(live: Stack) -> None:
    live.start_worker("io", concurrency=1, node="hc-node")
    assert run_healthcheck("worker-io", live.env(HOSTNAME="hc-node")) == 0
    assert run_healthcheck("worker-default", live.env(HOSTNAME="hc-node")) != 0, "no default worker runs on hc-node"


def test_beat_healthcheck_follows_its_schedule_file(live: Stack) -> None:
    env = live.env()
    assert run_healthcheck("beat", env) != 0, "no beat has run yet"
    beat = live.spawn("beat", log_name="beat")
    wait_until(lambda: run_healthcheck("beat", env) == 0 or beat.poll() is not None, timeout=60,
               what="beat to write its schedule file")
    assert beat.poll() is None
    stop_process(beat)
    stale = time.time() - 600  # as if beat had not ticked for ten minutes
    for path in live.home.glob("celerybeat-schedule*"):
        os.utime(path, (stale, stale))
    assert run_healthcheck("beat", env) != 0


def test_flower_healthcheck_passes_with_its_credentials_only(live: Stack) -> None:
    port = free_port()
    live.spawn("flower", "--port", str(port), log_name="flower", FLOWER_BASIC_AUTH="hc:right-password")
    wait_until(lambda: run_healthcheck("flower", live.env(FLOWER_BASIC_AUTH="hc:right-password"), port) == 0,
               timeout=60, what="Flower's /healthcheck to answer")
    assert run_healthcheck("flower", live.env(FLOWER_BASIC_AUTH="hc:wrong-password"), port) != 0


# ----------------------------------------------------------------------------- packaging
def _requirements() -> dict[str, Any]:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {req.name: req for req in map(Requirement, project["dependencies"])}


def test_kombu_and_flower_are_bounded_above_and_the_installed_versions_fit() -> None:
    """Rekku uses their internals (workers/heartbeat.py, workers/timer_sweep.py, rekku/flower_guard.py): a
    release that moves them must not install unnoticed."""
    from importlib.metadata import version

    for name in ("kombu", "flower"):
        spec = _requirements()[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name} has no upper bound: {spec}"
        assert spec.contains(version(name)), f"the installed {name} {version(name)} is outside {spec}"


def test_the_package_is_mit_licensed_with_its_license_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Rekku-on-Celery contributors" in text


def test_the_all_extra_is_every_runtime_feature_without_test_or_dev_tools() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (all_of,) = extras["all"]
    included = set(re.fullmatch(r"rekku-on-celery\[([a-z,]+)\]", all_of).group(1).split(","))
    assert included == set(extras) - {"all", "test", "dev"}, included
