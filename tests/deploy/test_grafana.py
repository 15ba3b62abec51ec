"""The Grafana dashboard: it parses, and every query reads only mirrorgate's agreed names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.agreed_metrics import LABEL_VALUES, LABELS, SERIES_NAMES
from tests.deploy.helpers import DEPLOY
from tests.deploy.promql import names, promtool_syntax_errors

DASHBOARD = DEPLOY / "grafana" / "mirrorgate-dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _queries(dashboard: dict[str, Any]) -> dict[str, str]:
    out = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    return out


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_dashboard_identity_and_layout(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "mirrorgate-rollout"
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


def test_every_query_reads_only_agreed_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    for title, expr in _queries(dashboard).items():
        used = names(expr)
        assert used.metrics, title
        assert used.metrics <= SERIES_NAMES, (title, used.metrics - SERIES_NAMES)
        assert used.labels <= LABELS, (title, used.labels - LABELS)
        for label, op, value in used.matchers:
            if op == "=" and label in LABEL_VALUES:
                assert value in LABEL_VALUES[label], (title, label, value)


def test_every_query_is_valid_promql(
    dashboard: dict[str, Any], promtool: str, tmp_path: Path
) -> None:
    assert promtool_syntax_errors(promtool, _queries(dashboard), tmp_path) == ""


def test_variables_are_defined_and_read_agreed_names(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    assert variables["datasource"]["query"] == "prometheus"
    for name, variable in variables.items():
        if variable["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert m, name
        selector, label = m.groups()
        assert label in LABELS
        assert names(selector).metrics <= SERIES_NAMES
        # "All" must also match series without the label (plain Prometheus has no namespace)
        assert variable["allValue"] == ".*"
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$(\w+)", text)) - {"__rate_interval", "__all"}
    assert used <= set(variables), used - set(variables)


def test_dashboard_shows_what_the_deployment_guide_says_to_watch(dashboard: dict[str, Any]) -> None:
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]

    def reading(metric: str) -> list[dict[str, Any]]:
        return [p for p in panels if any(metric in names(t["expr"]).metrics for t in p["targets"])]

    # traffic and drops
    assert reading("mirrorgate_proxy_requests_total") and reading("mirrorgate_shadow_dropped_total")
    assert reading("mirrorgate_recorder_dropped_total")
    # paired latency: quantiles per role from the same histogram
    latency = reading("mirrorgate_proxy_request_duration_seconds_bucket")
    assert any("role" in names(t["expr"]).labels for p in latency for t in p["targets"])
    # each gate's statistic against its threshold, in one panel repeated per gate
    gates = [
        p for p in reading("mirrorgate_gate_statistic") if p in reading("mirrorgate_gate_threshold")
    ]
    assert gates and gates[0].get("repeat") == "gate"
    # the verdict over time
    verdict = reading("mirrorgate_rollout_verdict")
    assert verdict and verdict[0]["type"] == "state-timeline"
