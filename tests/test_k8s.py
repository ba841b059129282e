"""deploy/k8s/ is valid Kubernetes and deploys what docker-compose.yml deploys.

Every manifest is checked against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: an unknown
field is an error). KEDA's ScaledObject and TriggerAuthentication are custom resources whose schemas that
package does not ship, so they are checked structurally here instead: what they scale exists, and they
watch the Redis lists the pools really consume (rekku/pools.py). Then the roles against compose
(tests/test_ops_files.py): the same roles, the same commands, each role the same environment variable
names and exactly the same secrets; and the pods' init container that waits for the migrate Job is run
for real against a database before and after ``rekku migrate``.
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from rekku.pools import POOLS
from tests.support import child_env, wait_until
from tests.test_ops_files import (
    ROLE_SECRETS,
    ROLES,
    command_argv,
    env_example,
    resolve_invocation,
    services,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
#: The Kubernetes versions the manifests are checked against: the oldest we claim, and the newest the
#: installed kubernetes-validate knows.
VERSIONS = ("1.28", kubernetes_validate.latest_version())
#: Custom resources: no schema in kubernetes-validate, checked by test_keda_* below.
KEDA_KINDS = frozenset({"ScaledObject", "TriggerAuthentication"})
#: ScaledObject spec fields KEDA 2 defines (a misspelt one would be ignored by the cluster: refused here).
SCALED_OBJECT_FIELDS = frozenset({"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                                  "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                                  "triggers"})
REDIS_TRIGGER_FIELDS = frozenset({"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
                                  "usernameFromEnv", "passwordFromEnv", "listName", "listLength",
                                  "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"})


# ----------------------------------------------------------------------------- readers
@cache
def manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) of every resource in deploy/k8s/ (kustomization.yaml is kustomize's, not one)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return tuple(docs)


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] in kinds]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def workloads() -> dict[str, dict[str, Any]]:
    """Role (the app.kubernetes.io/component label) -> its Deployment or Job."""
    roles: dict[str, dict[str, Any]] = {}
    for doc in of_kind("Deployment", "Job"):
        role = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert role not in roles, f"two workloads for {role}"
        roles[role] = doc
    return roles


def pod(role: str) -> dict[str, Any]:
    return workloads()[role]["spec"]["template"]["spec"]


def main_container(role: str) -> dict[str, Any]:
    containers = pod(role)["containers"]
    assert len(containers) == 1, role
    return containers[0]


def secret_keys(name: str) -> set[str]:
    secret = named("Secret", name)
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


def role_environment(role: str) -> tuple[set[str], set[str]]:
    """(every variable name a role's containers get, those of them that come from a Secret)."""
    names: set[str] = set()
    secret: set[str] = set()
    for container in [*pod(role).get("initContainers", []), *pod(role)["containers"]]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                names |= set(named("ConfigMap", source["configMapRef"]["name"])["data"])
            else:
                keys = secret_keys(source["secretRef"]["name"])
                names |= keys
                secret |= keys
        for entry in container.get("env", []):
            names.add(entry["name"])
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secret_keys(ref["name"]), f"{role}: {ref} names no key of that Secret"
                secret.add(entry["name"])
            ref = (entry.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in named("ConfigMap", ref["name"])["data"], f"{role}: {ref}"
    return names, secret


# ----------------------------------------------------------------------------- Kubernetes' schemas
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    checked = 0
    for name, doc in manifests():
        if doc["kind"] in KEDA_KINDS:
            continue  # custom resources: kubernetes-validate has no schema for them (tests below)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 12


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    """strict=True is what makes a typo an error rather than a field the cluster silently drops."""
    deployment = yaml.safe_load(yaml.safe_dump(workloads()["ingress"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert [i["name"] for i in kustomization["images"]] == ["rekku-on-celery"]


# ----------------------------------------------------------------------------- KEDA, structurally
def test_keda_scales_every_pool_on_the_redis_lists_it_consumes() -> None:
    broker = urlsplit(named("Secret", "rekku-broker")["stringData"]["REKKU_BROKER_URL"])
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind("ScaledObject")}
    assert set(scaled) == {f"rekku-worker-{pool}" for pool in POOLS}
    for pool, spec in POOLS.items():
        obj = scaled[f"rekku-worker-{pool}"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert set(obj["spec"]) <= SCALED_OBJECT_FIELDS, set(obj["spec"]) - SCALED_OBJECT_FIELDS
        named("Deployment", obj["spec"]["scaleTargetRef"]["name"])  # it scales a Deployment that exists
        assert obj["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 1 <= obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        # the shared queues, not the node's own terminal.<node> (it follows its pod, not the load)
        shared = [q for q in spec.queues("NODE") if not q.endswith(".NODE")]
        lists = []
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            assert set(meta) <= REDIS_TRIGGER_FIELDS, set(meta) - REDIS_TRIGGER_FIELDS
            assert meta["address"] == f"{broker.hostname}:{broker.port}", "KEDA watches another Redis"
            assert meta["databaseIndex"] == broker.path.strip("/"), "KEDA watches another Redis db"
            assert int(meta["listLength"]) > 0
            named("TriggerAuthentication", trigger["authenticationRef"]["name"])
            lists.append(meta["listName"])
        assert sorted(lists) == sorted(shared), f"{pool}: watches {lists}, consumes {shared}"
    for auth in of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secret_keys(ref["name"])


def test_keda_owns_the_worker_replica_counts() -> None:
    """A fixed replicas in a scaled Deployment is reset by every `kubectl apply`, fighting the autoscaler."""
    for pool in POOLS:
        assert "replicas" not in workloads()[f"worker-{pool}"]["spec"], pool


# ----------------------------------------------------------------------------- the roles, against compose
def test_the_same_roles_as_compose_running_the_same_commands() -> None:
    assert set(workloads()) == ROLES
    for role in ROLES:
        container = main_container(role)
        assert container["image"] == "rekku-on-celery"
        assert "command" not in container, "the image's entrypoint is rekku: args only"
        assert resolve_invocation(container["args"]) == resolve_invocation(command_argv(services()[role])), role
    assert workloads()["migrate"]["kind"] == "Job"
    assert pod("migrate")["restartPolicy"] in ("OnFailure", "Never")


def test_each_role_gets_the_same_variables_and_exactly_the_same_secrets_as_in_compose() -> None:
    for role in sorted(ROLES):
        svc = services()[role]
        compose_env = svc.get("environment") or {}
        allowed = set(compose_env) | (set(env_example()) if svc.get("env_file") == ".env" else set())
        required = {k for k, v in compose_env.items() if v not in (None, "")}
        names, secret = role_environment(role)
        assert names <= allowed, f"{role}: compose does not give it {sorted(names - allowed)}"
        assert required <= names, f"{role}: compose gives it {sorted(required - names)}, Kubernetes does not"
        assert secret == ROLE_SECRETS[role], (f"{role}: extra {sorted(secret - ROLE_SECRETS[role])}, "
                                              f"missing {sorted(ROLE_SECRETS[role] - secret)}")


def test_flower_has_no_database_password_nor_api_token() -> None:
    names, _ = role_environment("flower")
    assert not names & {"DB_PASS", "REKKU_API_TOKEN", "DB_HOST"}, names


def test_exactly_one_beat_and_it_is_recreated_not_rolled() -> None:
    beat = workloads()["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    assert not [doc for doc in of_kind("ScaledObject", "HorizontalPodAutoscaler")
                if doc["spec"]["scaleTargetRef"]["name"] == beat["metadata"]["name"]]


def test_probes_check_what_the_compose_healthchecks_check() -> None:
    for role in ROLES - {"migrate"}:
        assert main_container(role).get("livenessProbe"), f"{role} has no liveness probe"
    for role in ("ingress", "flower"):
        assert main_container(role).get("readinessProbe"), f"{role} is behind a Service: it needs a readiness probe"
    ingress = main_container("ingress")
    assert ingress["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ingress["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for pool in POOLS:
        container = main_container(f"worker-{pool}")
        compose_test = services()[f"worker-{pool}"]["healthcheck"]["test"][1].replace("$$", "$")
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"] == ["sh", "-c", compose_test], (pool, probe)
    # beat's, Flower's and the receiver's are the compose checks, which tests/test_ops_files.py runs for real
    for role in ("beat", "flower", "receive"):
        assert main_container(role)["livenessProbe"]["exec"]["command"] == services()[role]["healthcheck"]["test"][1:]


def test_secrets_are_only_in_secrets() -> None:
    """No secret value in a ConfigMap or a literal env value: those are readable by anyone who can read pods."""
    for cm in of_kind("ConfigMap"):
        assert not set(cm["data"]) & set(ROLE_SECRETS["ingress"] | ROLE_SECRETS["worker-io"]
                                         | ROLE_SECRETS["flower"]), cm["metadata"]["name"]
    for role in ROLES:
        for container in [*pod(role).get("initContainers", []), *pod(role)["containers"]]:
            literal = {e["name"] for e in container.get("env", []) if "value" in e}
            assert not literal & set().union(*ROLE_SECRETS.values()), (role, literal)


# ----------------------------------------------------------------------------- the wait for the migrate Job, for real
def test_pods_wait_for_the_migrate_job_then_start(tmp_path: Path) -> None:
    init = [c for c in pod("ingress")["initContainers"] if c["name"] == "wait-for-migrate"]
    assert init, "the ingress does not wait for the migrate Job"
    for role in ("ingress", "receive", *(f"worker-{p}" for p in POOLS)):
        assert pod(role)["initContainers"] == init, f"{role} waits differently (or not at all)"
    command = init[0]["command"]
    assert command[:2] == ["python", "-c"]
    env = child_env(REKKU_DATABASE_URL=f"sqlite:///{tmp_path / 'rekku.db'}", REKKU_HOME=str(tmp_path / "home"),
                    PYTHONUNBUFFERED="1")
    log = tmp_path / "wait.log"
    with log.open("w") as out:
        waiter = subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "waiting for the rekku-migrate Job" in log.read_text() or waiter.poll() is not None,
                   timeout=60, what="the init container to wait for the schema")
        assert waiter.poll() is None, f"it went on without a migrated schema:\n{log.read_text()}"
        migrate = subprocess.run([sys.executable, "-m", "rekku", "migrate"], env=env, capture_output=True, text=True,
                                 timeout=180)
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        assert waiter.wait(timeout=60) == 0, log.read_text()
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
