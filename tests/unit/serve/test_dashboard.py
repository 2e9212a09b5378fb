"""The canary dashboard and the documented PromQL name only metrics the app really exports.

Exported names come from serve/metrics.py, whose names tests/integration/test_ray_metrics_export.py
proves against a live Ray; Ray Serve's replica metrics are checked there as well.
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

from amalia_serve import autoscaling_policy as autoscaling
from amalia_serve import metrics as m

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "serve" / "dashboards" / "amalia-canary.json"
ROUTING_DOC = ROOT / "docs" / "routing.md"
AUTOSCALING_DOC = ROOT / "docs" / "autoscaling.md"
KNOWN_METRICS = (
    m.EXPORTED_METRIC_NAMES
    | autoscaling.EXPORTED_METRIC_NAMES
    | {m.SERVE_REPLICA_HEALTHY, m.SERVE_TARGET_REPLICAS}
)
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$variant": ".*"}

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not calls or keywords."""
    bare = _LABEL_LISTS.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _QUOTED.sub('""', expr))))
    names = set()
    for match in _IDENTIFIER.finditer(bare):
        word = match.group()
        if word.lower() in _KEYWORDS or bare[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _panel_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def _template_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def _doc_promql() -> list[str]:
    return re.findall(r"```promql\n(.*?)```", ROUTING_DOC.read_text(encoding="utf-8"), re.DOTALL)


# === the name parser itself ===


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (variant) (rate(ray_amalia_requests_totl{status_class="5xx"}[$__interval]))',
            {"ray_amalia_requests_totl"},
        ),
        (
            'histogram_quantile(0.95, sum(rate(a_bucket{x=~"y|z"}[5m])) by (le)) > 1e-3',
            {"a_bucket"},
        ),
        ("(x or 0 * y) / ignoring (variant) group_left sum(z)", {"x", "y", "z"}),
    ],
)
def test_metric_names_finds_selected_metrics_when_expr_nests_functions(
    expr: str, names: set[str]
) -> None:
    assert metric_names(expr) == names


# === dashboard ===


def test_dashboard_queries_name_only_exported_metrics_when_parsed() -> None:
    dashboard = _dashboard()
    exprs = list(_panel_exprs(dashboard))
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= KNOWN_METRICS, f"{title}: unknown {names - KNOWN_METRICS}"
    for query in _template_queries(dashboard):
        # label_values(metric, label): the second argument is a label, not a metric.
        metric = re.fullmatch(r"label_values\((\w+),\s*variant\)", query)
        assert metric is not None and metric.group(1) in KNOWN_METRICS, query


def test_dashboard_compares_variants_when_opened() -> None:
    dashboard = _dashboard()
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in (
        "traffic share",
        "error rate",
        "time to first token",
        "tokens per second",
        "replicas",
    ):
        assert topic in titles
    for title, expr in _panel_exprs(dashboard):
        assert "$variant" in expr, f"{title} ignores the variant selector"
    ttft = next(e for t, e in _panel_exprs(dashboard) if "first token" in t.lower() and "0.95" in e)
    assert "by (variant, le)" in ttft


def test_dashboard_explains_autoscaling_per_variant_when_opened() -> None:
    exprs = [expr for _, expr in _panel_exprs(_dashboard())]
    for name in autoscaling.EXPORTED_METRIC_NAMES:
        assert any(name in expr for expr in exprs), f"no panel shows {name}"
    shown = set()
    for expr in exprs:
        for match in re.finditer(r'signal=~"([^"]+)"', expr):
            shown |= set(match.group(1).split("|"))
    assert shown >= set(autoscaling.SIGNALS) - {"batch_slots", "ongoing"}
    assert shown <= set(autoscaling.SIGNALS), shown - set(autoscaling.SIGNALS)


def test_autoscaling_doc_lists_every_autoscaling_metric_and_signal() -> None:
    text = AUTOSCALING_DOC.read_text(encoding="utf-8")
    for name in autoscaling.EXPORTED_METRIC_NAMES:
        assert f"`{name}`" in text, f"{name} missing from docs/autoscaling.md"
    for signal in autoscaling.SIGNALS:
        assert f"`{signal}`" in text, f"signal {signal} missing from docs/autoscaling.md"


def test_dashboard_uses_the_datasource_variable_when_imported() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["variant"]["multi"] and variables["variant"]["includeAll"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


# === documented PromQL (the operator's analysis queries) ===


def test_routing_doc_promql_names_only_exported_metrics_when_parsed() -> None:
    queries = _doc_promql()
    assert len(queries) >= 2
    for query in queries:
        names = metric_names(query)
        assert names and names <= KNOWN_METRICS, (query, names - KNOWN_METRICS)


def test_doc_metric_table_lists_every_exported_metric_when_read() -> None:
    text = ROUTING_DOC.read_text(encoding="utf-8")
    for name in m.EXPORTED_METRIC_NAMES:
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert f"`{family}" in text, f"{family} missing from docs/routing.md"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_all_queries_parse_as_promql_when_checked_by_promtool(tmp_path: Path) -> None:
    exprs = [expr for _, expr in _panel_exprs(_dashboard())] + _doc_promql()
    rules = []
    for index, expr in enumerate(exprs):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"amalia:check_{index}", "expr": expr.strip()})
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "amalia", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rule_file)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
