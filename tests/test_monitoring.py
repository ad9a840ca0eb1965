"""deploy/prometheus and deploy/grafana: promtool accepts them, every alert is unit-tested both
ways, the dashboard and rules name only metrics a live instance exports, and that instance's
/metrics passes `promtool check metrics`."""

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

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "satchel.json"
# Quoted strings in PromQL (label values, regexes) hold no metric names.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"[a-zA-Z_:]*satchel_[a-zA-Z0-9_:]*|\bup\b")


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, installed from Debian's `prometheus` package when missing and we are root."""
    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
        ):
            subprocess.run(command, check=True, capture_output=True, env=env, timeout=600)
        found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI")
        pytest.skip("promtool is missing and only root can install it")
    return found


def _promtool(promtool: str, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, cwd=PROMETHEUS, timeout=120
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output
    return output


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def _names_in(expr: str) -> set[str]:
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _families(exposition: str) -> dict[str, str]:
    """Metric family -> type, from the exposition's TYPE lines (whether it has samples or not)."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            found[name] = kind
    return found


def _series_names(families: dict[str, str]) -> set[str]:
    names = {"up"}  # set by Prometheus itself for every target
    for name, kind in families.items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names |= {name + suffix for suffix in suffixes}
    return names


async def _scrape(app: Any) -> str:
    # A few answered requests, so labelled series exist and their labels are linted too.
    for path in ("/health", "/projects", "/nowhere"):
        await app.fetch(path)
    reply = await app.fetch("/metrics")
    assert reply.code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return reply.body.decode()


def test_prometheus_config_and_rules_are_valid(promtool: str) -> None:
    out = _promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out
    out = _promtool(promtool, "check", "rules", "rules.yml")
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_rule_unit_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "rules_test.yml")


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {
        "SatchelHighErrorRate",
        "SatchelHighLatencyP99",
        "SatchelArchivesFailing",
        "SatchelTasksWaitingGrowing",
        "SatchelWebsocketClientsDropped",
        "SatchelInstanceDown",
        "SatchelDatabaseDown",
    } <= alerts
    cases = [
        case
        for test in yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


async def test_live_metrics_pass_promtool_lint(app: Any, promtool: str) -> None:
    exposition = await _scrape(app)
    assert _promtool(promtool, "check", "metrics", stdin=exposition.encode()).strip() == ""
    assert 'satchel_http_requests_total{method="GET",route="/projects",status="200"}' in exposition
    assert "satchel_database_up 1.0" in exposition


async def test_dashboard_and_rules_name_only_exported_metrics(app: Any) -> None:
    families = _families(await _scrape(app))
    exported = _series_names(families)
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    known = exported | recorded
    rule_exprs = [str(rule["expr"]) for rule in _rules()]
    dashboard_exprs = _dashboard_exprs()
    for expr in rule_exprs + dashboard_exprs:
        names = _names_in(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"unknown metrics {names - known} in {expr!r}"
    # Every family Satchel exports is on the dashboard (the _created timestamps aside).
    own = {f for f in families if f.startswith("satchel_") and not f.endswith("_created")}
    shown = {name for expr in dashboard_exprs for name in _names_in(expr)}
    missing = {f for f in own if not any(n.startswith(f) for n in shown)}
    assert missing == set(), f"exported but not on the dashboard: {missing}"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "satchel"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used - variables)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "5xx", "latency", "archive", "waiting", "websocket"):
        assert topic in titles, topic
