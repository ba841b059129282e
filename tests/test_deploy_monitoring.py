"""deploy/grafana/rekku.json and deploy/prometheus/alerts.yml: they parse, they cover what operators
watch, and every metric their PromQL names is one a live /metrics serves (after some traffic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Stack, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "rekku.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Series Prometheus makes itself (not on /metrics): the scrape's own health.
PROMETHEUS_OWN = frozenset({"up"})
#: PromQL words that look like metric names: operators and modifiers (functions and aggregations are
#: told by the "(" that follows them, or by the "by (...)" clause after the aggregation's name).
PROMQL_WORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                          "bool", "offset", "inf", "nan", "atan2"})
AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: strings, label matchers, label lists, ranges and
    Grafana's variables removed, then every identifier that is not a function, an aggregation, an
    operator or a number's part."""
    text = _GRAFANA_VARIABLE.sub("1m", expr)
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers (their strings are empty now)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\d+\w*", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(1)
        rest = text[match.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("(") or word in AGGREGATIONS:
            continue
        if re.fullmatch(r"\d.*|e\d*", word):  # a number's exponent or a duration's unit
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels += panel.get("panels", [])  # rows
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def alert_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_alerts() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def served_names(scrape: str) -> set[str]:
    """Every sample name a scrape holds, and those its declared families stand for (a counter with no
    sample yet is still a name: ``rekku_reconciler_requeued_total`` before anything was re-enqueued)."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    for family in text_string_to_metric_families(scrape):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def unknown_names(exprs: list[str], served: set[str]) -> set[str]:
    return {n for e in exprs for n in metric_names(e)} - served - PROMETHEUS_OWN


# ----------------------------------------------------------------------------- the files themselves
def test_metric_names_are_read_out_of_promql_carefully() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, type) (rate(rekku_a_bucket{type=~"x|y and z", pool!="io"}'
            '[$__rate_interval]))) > 1e3 unless on (pool) max without (instance) (rekku_b offset 5m) '
            'or absent(up{job="rekku-ingress"}) and bool rekku_c:ratio5m / ignoring(le) group_left rekku_d')
    assert metric_names(expr) == {"rekku_a_bucket", "rekku_b", "up", "rekku_c:ratio5m", "rekku_d"}
    assert metric_names('sum(rate(rekku_x_total[5m])) by (type)') == {"rekku_x_total"}
    assert metric_names("topk(3, rekku_y) * 100") == {"rekku_y"}


def test_the_dashboard_shows_what_operators_watch() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] == "Rekku"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "failures", "queue depth", "oldest queued", "workers up",
                  "dead letters", "ingress up"):
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_alerts_cover_what_pages_an_operator() -> None:
    rules = [r for g in load_alerts()["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"RekkuIngressDown", "RekkuPoolWithoutWorkers", "RekkuOldestQueuedActionTooOld", "RekkuStuckActions",
            "RekkuDeadLettersGrowing"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m")), rule["alert"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "rekku_workers_up" in metric_names(by_name["RekkuPoolWithoutWorkers"])
    assert "rekku_dead_letters" in metric_names(by_name["RekkuDeadLettersGrowing"])
    assert "rekku_stuck_actions" in metric_names(by_name["RekkuStuckActions"])
    assert "rekku_oldest_queued_action_seconds" in metric_names(by_name["RekkuOldestQueuedActionTooOld"])
    assert "up" in metric_names(by_name["RekkuIngressDown"])


# ----------------------------------------------------------------------------- against a live /metrics
@pytest.fixture(scope="module")
def scrape(stack: Stack) -> str:
    """/metrics after actions accepted, rejected, run, failed (and the workers' run metrics sent)."""
    stack.submit([{"type": "no_such_type_here", "payload": {}}])
    assert stack.run("echo")["status"] == "succeeded"
    assert stack.run("tk_fail")["status"] == "failed"
    wanted = ('rekku_action_runs_total{status="failed",type="tk_fail"}', "rekku_action_run_seconds_bucket")
    return wait_until(lambda: all(w in (t := stack.get("/metrics").text) for w in wanted) and t, timeout=30,
                      what="the workers' run metrics")


def test_every_metric_the_dashboard_names_is_served(scrape: str) -> None:
    exprs = dashboard_exprs(load_dashboard())
    assert exprs and not unknown_names(exprs, served_names(scrape))


def test_every_metric_the_alerts_name_is_served(scrape: str) -> None:
    exprs = alert_exprs(load_alerts())
    assert exprs and not unknown_names(exprs, served_names(scrape))


def test_a_misspelled_metric_is_caught(scrape: str) -> None:
    """The check above fails for a name /metrics does not serve (a typo, or a metric renamed)."""
    alerts = yaml.safe_load(ALERTS.read_text().replace("rekku_dead_letters", "rekku_dead_leters"))
    assert unknown_names(alert_exprs(alerts), served_names(scrape)) == {"rekku_dead_leters"}
    dashboard = json.loads(DASHBOARD.read_text().replace("rekku_action_run_seconds_bucket",
                                                          "rekku_action_run_second_bucket"))
    assert unknown_names(dashboard_exprs(dashboard), served_names(scrape)) == {"rekku_action_run_second_bucket"}
