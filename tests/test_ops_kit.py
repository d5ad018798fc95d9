"""The operations kit: Prometheus alert rules (checked and unit-tested with promtool), the Grafana
dashboard, the production runbook and the API reference stay consistent with the code.

Every metric a rule or a panel queries must be registered in `semantic_core.observability.Metrics`
(or be one of a few standard names from Prometheus itself and node_exporter), and every alert must
link to an existing section of the runbook.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_EXAMPLE = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "config" / "grafana" / "semantic-dashboard.json"
RUNBOOK = ROOT / "docs" / "PRODUCTION_RUNBOOK.md"
API_DOC = ROOT / "docs" / "API.md"
RETENTION = ROOT / "config" / "logging" / "retention.md"

EXPECTED_RULES = 10
SEVERITIES = ("critical", "warning", "info")
# Series that do not come from this process: Prometheus' scrape health and node_exporter.
EXTERNAL_METRICS = frozenset({"up", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"})
# PromQL words that look like identifiers but are not series names.
PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
# Grafana macros and dashboard variables, replaced by plausible values before promtool parses a query.
GRAFANA_MACROS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "instance": ".*"}


# Helpers ---------------------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed: install Prometheus' tools, e.g. `apt-get install prometheus` "
            "(Debian/Ubuntu) or `brew install prometheus` (macOS)"
        )
    return path


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def registered_metric_names() -> set[str]:
    """Every series name the process can expose, as Prometheus sees it (suffixes included)."""
    from semantic_core.observability import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        base = family.name
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.update({f"{base}_total", f"{base}_created"})
        elif family.type == "histogram":
            names.update({f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"})
        elif family.type == "summary":
            names.update({base, f"{base}_sum", f"{base}_count", f"{base}_created"})
        else:
            names.add(base)
    return names


def metric_names_in(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()[:1]
        if following == "(" or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def unknown_metrics(exprs: dict[str, str]) -> dict[str, set[str]]:
    known = registered_metric_names() | EXTERNAL_METRICS
    return {where: missing for where, expr in exprs.items() if (missing := metric_names_in(expr) - known)}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (before de-duplication)."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_headings(path: Path) -> list[tuple[int, str, str, int]]:
    """(level, text, anchor, line index) of every heading outside fenced code blocks."""
    headings = []
    seen: dict[str, int] = {}
    in_code = False
    for i, line in enumerate(path.read_text().splitlines()):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            headings.append((len(match.group(1)), match.group(2), slug if count == 0 else f"{slug}-{count}", i))
    return headings


def markdown_section(path: Path, anchor: str) -> str:
    lines = path.read_text().splitlines()
    headings = markdown_headings(path)
    for n, (level, _, slug, start) in enumerate(headings):
        if slug == anchor:
            end = next((line for lvl, _, _, line in headings[n + 1 :] if lvl <= level), len(lines))
            return "\n".join(lines[start:end])
    raise AssertionError(f"no heading with anchor #{anchor} in {path.name}")


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    exprs = {}
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            exprs[f"panel {panel['id']} ({panel['title']}) {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", query)
            exprs[f"variable {variable['name']}"] = match.group(1) if match else query
    return exprs


def expand_grafana_macros(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_MACROS[m.group(1)], expr)


# promtool ---------------------------------------------------------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    result = run_promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {EXPECTED_RULES} rules found" in result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = run_promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_example_prometheus_configuration_is_valid() -> None:
    result = run_promtool("check", "config", PROMETHEUS_EXAMPLE.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expand_grafana_macros(expr)}
        for i, expr in enumerate(dashboard_exprs(dashboard).values())
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr


# Alert rules -------------------------------------------------------------------------------------------


def test_ten_alerts_with_three_severities_and_full_annotations() -> None:
    rules = load_rules()
    assert len(rules) == EXPECTED_RULES
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names), "alert names must be unique"
    severities = [rule["labels"]["severity"] for rule in rules]
    assert set(severities) == set(SEVERITIES)
    for severity in SEVERITIES:
        assert severities.count(severity) >= 2, f"fewer than two {severity} alerts"
    for rule in rules:
        assert "for" in rule, f"{rule['alert']}: say how long the condition must hold (`for:`)"
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{rule['alert']}: missing annotation {key}"


def test_alert_expressions_only_use_metrics_that_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in load_rules()}
    assert unknown_metrics(exprs) == {}


def test_every_runbook_url_points_at_a_section_that_names_its_alert() -> None:
    anchors = {slug for _, _, slug, _ in markdown_headings(RUNBOOK)}
    for rule in load_rules():
        target, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert target == "docs/PRODUCTION_RUNBOOK.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in the runbook"
        assert rule["alert"] in markdown_section(RUNBOOK, anchor), (
            f"the runbook section #{anchor} does not name {rule['alert']}"
        )


def test_unit_tests_make_every_alert_fire_and_check_a_silent_case() -> None:
    document = yaml.safe_load(ALERTS_TEST.read_text())
    cases = [case for test in document["tests"] for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert fired == {rule["alert"] for rule in load_rules()}
    assert any(case.get("exp_alerts") == [] for case in cases), "no case checks that an alert stays silent"


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, path) (rate(semantic_request_duration_seconds_bucket"
        '{path!~"/v1/messages|up"}[5m]))) > 5 and on (instance) up == 0 or x_total offset 15m '
        "unless 5e9 < semantic_ready"
    )
    assert metric_names_in(expr) == {"semantic_request_duration_seconds_bucket", "up", "x_total", "semantic_ready"}
    assert metric_names_in("sum(rate(semantic_request_total[$__rate_interval])) / 1024^3") == {"semantic_request_total"}


# Grafana dashboard -----------------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_queries_only_use_metrics_that_exist() -> None:
    assert unknown_metrics(dashboard_exprs(json.loads(DASHBOARD.read_text()))) == {}


def test_dashboard_shows_the_key_metrics() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())).values():
        used |= metric_names_in(expr)
    wanted = {
        "semantic_request_total",
        "semantic_request_duration_seconds_bucket",
        "semantic_time_to_first_token_seconds_bucket",
        "semantic_tokens_per_second",
        "semantic_tokens_total",
        "semantic_batch_size",
        "semantic_queue_depth",
        "semantic_pool_utilization_ratio",
        "semantic_pool_blocks",
        "semantic_agents",
        "semantic_agents_active",
        "semantic_cache_hit_total",
        "semantic_evictions_total",
        "semantic_agent_saves_total",
        "semantic_agent_loads_total",
        "semantic_agent_save_seconds_bucket",
        "semantic_agent_load_seconds_bucket",
        "semantic_quarantined_files_total",
        "semantic_cache_disk_bytes",
        "semantic_rate_limited_total",
        "semantic_ready",
    }
    assert wanted - used == set()


# Documentation ---------------------------------------------------------------------------------------


def test_api_reference_documents_every_route() -> None:
    from semantic_core.api import agents, messages, openai, probes

    text = API_DOC.read_text()
    missing = []
    for module in (messages, openai, agents, probes):
        for route in module.router.routes:
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {model_id:path} -> {model_id}
            for method in sorted(route.methods):
                if not re.search(re.escape(f"{method} {path}") + r"(?![\w/{])", text):
                    missing.append(f"{method} {path}")
    assert missing == []


def test_api_reference_internal_links_resolve() -> None:
    anchors = {slug for _, _, slug, _ in markdown_headings(API_DOC)}
    links = set(re.findall(r"\]\(#([^)]+)\)", API_DOC.read_text()))
    assert links - anchors == set()


def test_runbook_internal_links_resolve_and_relative_links_exist() -> None:
    text = RUNBOOK.read_text()
    anchors = {slug for _, _, slug, _ in markdown_headings(RUNBOOK)}
    assert set(re.findall(r"\]\(#([^)]+)\)", text)) - anchors == set()
    for target in re.findall(r"\]\((\.\./[^)#]+)\)", text):
        assert (RUNBOOK.parent / target).resolve().exists(), target


def test_documented_settings_exist() -> None:
    from semantic_core.config import Settings, env_name

    known = {env_name(name) for name in Settings.model_fields}
    for doc in (RUNBOOK, API_DOC, RETENTION, ALERTS):
        mentioned = set(re.findall(r"\bSEMANTIC_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text()))
        assert mentioned - known == set(), doc.name
