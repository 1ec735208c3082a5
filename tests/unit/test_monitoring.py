"""k8s/monitoring/: the alert rules, their promtool unit tests, the PrometheusRule, the
Grafana dashboard and the kustomization.

Every metric a rule or a dashboard query names must be one sagaz exposes
(``sagaz.metrics.CATALOGUE``): a renamed metric silently turns an alert into one that never
fires and a panel into an empty one, which no one notices until the night it matters.
promtool (Debian: ``apt-get install prometheus``) checks and unit-tests the rules; without it
these tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sagaz.metrics import CATALOGUE, exposed_names

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "k8s" / "monitoring"
RULES = MON / "sagaz-alerts.rules.yml"
PROMTOOL_TESTS = sorted((MON / "tests").glob("*.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# What the issue asks for, beyond which any alert is welcome.
REQUIRED_ALERTS = {
    "OutboxHighLag", "OutboxWorkerDown", "OutboxHighErrorRate",
    "OptimisticSendHighFailureRate", "SagaStuck", "SagasFailed", "DeadLettersGrowing",
    "ConsumerLagHigh", "OrchestratorNotReady",
}

# Series Prometheus makes itself, not scraped from sagaz.
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                  "scrape_samples_post_metric_relabeling", "scrape_series_added",
                  "ALERTS", "ALERTS_FOR_STATE"}
# Labels Prometheus (or the Prometheus operator) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "service", "endpoint", "container"}

EXPOSED: dict[str, Any] = {n: f for f in CATALOGUE.values() for n in exposed_names(f)}


# --- a PromQL reader: the metric names (and label matchers) an expression uses ----------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_TOKEN = re.compile(r"""
    (?P<matchers>\{[^{}]*\})
  | (?P<range>\[[^\[\]]*\])
  | (?P<number>(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[a-zA-Z0-9]*)
  | (?P<variable>\$\{?\w+\}?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<space>\s+)
  | (?P<other>.)
""", re.X | re.S)
# Keywords followed by a parenthesised list of label names, not of expressions.
_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregations may be followed by "by (...)" rather than "(": never metric names either.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                 "count_values", "bottomk", "topk", "quantile"}
_KEYWORDS = _LABEL_LIST | _AGGREGATIONS | {"and", "or", "unless", "offset", "bool", "atan2",
                                           "inf", "nan", "Inf", "NaN"}


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector in ``expr``.

    Strings go first (a label value may hold anything, a Grafana variable too), then the
    tokens: an identifier is a metric name unless it calls a function or aggregation (next
    token is "("), is a keyword, or is a label name in a matcher or a by/on list. Grafana's
    ``$__rate_interval`` and friends live in ranges or strings, which are dropped."""
    out: list[tuple[str, set[str]]] = [  # {__name__="x"}: the only name inside a string
        (n, set()) for n in re.findall(r'__name__\s*=\s*"([^"]*)"', expr)]
    text = _STRING.sub('""', expr)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)
              if m.lastgroup != "space"]
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and value in _LABEL_LIST and nxt[1] == "(":
            while i < len(tokens) and tokens[i][1] != ")":  # skip the label list
                i += 1
        elif kind == "ident" and value not in _KEYWORDS and nxt[1] != "(":
            labels: set[str] = set()
            if nxt[0] == "matchers":
                labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)",
                                        nxt[1]))
            out.append((value, labels))
        i += 1
    return out


def promql_metrics(expr: str) -> set[str]:
    return {name for name, _ in promql_selectors(expr)}


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, step_name) (rate('
            'saga_step_duration_seconds_bucket{saga=~"$saga",action="run"}[$__rate_interval])))'
            ' / ignoring (x) group_left (y) other_metric offset 10m'
            ' or label_replace(up{job=~".*outbox.*"} == bool 0, "a", "b", "", "")'
            ' and on() vector(1) > 1e3 unless sum(x:recorded:rate5m) without (pod)')
    assert promql_metrics(expr) == {"saga_step_duration_seconds_bucket", "other_metric",
                                    "up", "x:recorded:rate5m"}
    assert ("saga_step_duration_seconds_bucket", {"saga", "action"}) in \
        promql_selectors(expr)
    assert promql_metrics('sum(rate(x_total[5m:1m])) by (job) * 2') == {"x_total"}
    assert promql_metrics('{__name__="named_total", job="a"}') == {"named_total"}


def check_selectors(expr: str, where: str) -> list[str]:
    """What is wrong with the metric names and label matchers of ``expr``."""
    errors = []
    for name, labels in promql_selectors(expr):
        if name in BUILTIN_SERIES:
            continue
        family = EXPOSED.get(name)
        if family is None:
            errors.append(f"{where}: {name!r} is not a metric sagaz exposes "
                          f"(sagaz/metrics.py, docs/metrics.md)")
            continue
        known = set(family.labels) | TARGET_LABELS | (
            {"le"} if name.endswith("_bucket") else set())
        if labels - known:
            errors.append(f"{where}: {name} has no label {sorted(labels - known)} "
                          f"(its labels: {family.labels})")
    return errors


# --- the rules ------------------------------------------------------------------------

def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


ALERT_NAMES = [a["alert"] for a in alerts()]


def test_the_rules_have_the_issues_alerts_each_once() -> None:
    assert len(ALERT_NAMES) >= 8
    assert REQUIRED_ALERTS <= set(ALERT_NAMES)
    assert len(set(ALERT_NAMES)) == len(ALERT_NAMES)


@pytest.mark.parametrize("alert", alerts(), ids=ALERT_NAMES)
def test_every_alert_has_a_severity_a_summary_and_a_runbook_that_exists(
        alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("critical", "warning", "info")
    notes = alert["annotations"]
    assert notes["summary"] and notes["description"]
    anchor = alert["alert"].lower()
    assert notes["runbook_url"] == f"docs/operations.md#{anchor}"
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)
    assert alert["alert"] in headings, f"docs/operations.md has no section {alert['alert']}"


def test_every_metric_a_rule_names_is_one_sagaz_exposes() -> None:
    errors = []
    for group in rule_groups():
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            errors += check_selectors(rule["expr"], f"rule {name}")
    assert errors == []


def test_the_check_catches_a_metric_that_does_not_exist() -> None:
    assert check_selectors('rate(outbox_pending_total[5m]) > 0', "x") == [
        "x: 'outbox_pending_total' is not a metric sagaz exposes "
        "(sagaz/metrics.py, docs/metrics.md)"]
    assert check_selectors('saga_in_flight{state="running"}', "x") == [
        "x: saga_in_flight has no label ['state'] (its labels: ('saga', 'status'))"]
    assert check_selectors('saga_execution_duration_seconds > 1', "x")  # a histogram's base


def test_the_prometheusrule_carries_exactly_the_rule_files_groups() -> None:
    doc = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    assert doc["spec"]["groups"] == rule_groups()


def promtool_cases() -> dict[str, set[bool]]:
    """alert name -> {True: a case where it fires, False: one where it stays quiet}."""
    cases: dict[str, set[bool]] = {}
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../sagaz-alerts.rules.yml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    return cases


def test_every_alert_has_a_promtool_case_where_it_fires_and_one_where_it_is_quiet() -> None:
    cases = promtool_cases()
    assert set(cases) <= set(ALERT_NAMES), "a promtool test names an alert that is not there"
    missing = {a: sorted({"fires", "quiet"} - {"fires" if c else "quiet"
                                                for c in cases.get(a, set())})
               for a in ALERT_NAMES}
    assert {a: m for a, m in missing.items() if m} == {}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool"
                                        if os.access("/usr/bin/promtool", os.X_OK) else None)
    if path is None:
        message = "promtool is not installed (Debian: apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true needs it", pytrace=False)
        pytest.skip(message)
    return path


def test_promtool_checks_the_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in proc.stdout


def test_promtool_unit_tests_of_every_alert_pass(promtool: str) -> None:
    assert PROMTOOL_TESTS
    proc = subprocess.run([promtool, "test", "rules", *map(str, PROMTOOL_TESTS)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(PROMTOOL_TESTS)


def test_promtool_fails_a_rule_test_whose_alert_does_not_fire(promtool: str,
                                                              tmp_path: Path) -> None:
    """The unit tests are not vacuous: the same case against a rule that never fires fails."""
    broken = RULES.read_text().replace(
        "max without (instance, pod) (outbox_pending_events_total) > 5000",
        "max without (instance, pod) (outbox_pending_events_total) > 5e9")
    (tmp_path / "sagaz-alerts.rules.yml").write_text(broken)
    (tmp_path / "tests").mkdir()
    shutil.copy(MON / "tests" / "outbox.yml", tmp_path / "tests" / "outbox.yml")
    proc = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests" / "outbox.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "alertname: OutboxHighLag" in proc.stdout + proc.stderr


# --- the dashboard and the kustomization ------------------------------------------------

def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MON / "sagaz-dashboard.json").read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def test_the_dashboard_is_json_with_unique_panel_ids_and_a_query_per_panel() -> None:
    doc = dashboard()
    assert doc["title"] and doc["uid"]
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels(doc):
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert all(t["expr"].strip() for t in p["targets"])
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in panels(doc))
    for topic in ("throughput", "duration", "in flight", "failures", "compensations",
                  "outbox lag", "oldest pending", "consumer lag", "dead letters",
                  "readiness"):
        assert topic in titles, f"no panel about {topic}"


def test_every_metric_a_dashboard_query_names_is_one_sagaz_exposes() -> None:
    doc = dashboard()
    errors = []
    for p in panels(doc):
        for t in p.get("targets", []):
            errors += check_selectors(t["expr"], f"panel {p['title']!r} {t['refId']}")
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            errors += check_selectors(f"{m[1]}{{{m[2]}=\"\"}}", f"variable {var['name']}")
    assert errors == []


def test_the_kustomization_ships_the_rule_and_the_dashboard_for_grafanas_sidecar() -> None:
    doc = yaml.safe_load((MON / "kustomization.yaml").read_text())
    assert doc["kind"] == "Kustomization"
    assert doc["resources"] == ["prometheusrule.yaml"]
    assert doc["generatorOptions"]["disableNameSuffixHash"] is True
    [gen] = doc["configMapGenerator"]
    assert gen["files"] == ["sagaz-dashboard.json"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    for name in doc["resources"] + gen["files"]:
        assert (MON / name).is_file(), name
