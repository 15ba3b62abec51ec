"""Prometheus rules (promtool check + unit tests) and the metrics exposition format."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import regen_prometheusrule
from tests.deploy.agreed_metrics import AGREED, LABEL_VALUES, LABELS, SERIES_NAMES, sample_registry
from tests.deploy.helpers import DEPLOY, run_tool
from tests.deploy.promql import names

RULES = DEPLOY / "prometheus" / "mirrorgate-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "mirrorgate-rules.test.yaml"
REQUIRED_ALERTS = {
    "MirrorgateCandidateAborted",
    "MirrorgateShadowDropRateHigh",
    "MirrorgateRecorderDropping",
    "MirrorgateGateNearLimit",
}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules(promtool: str) -> None:
    result = run_tool([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    result = run_tool([promtool, "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert REQUIRED_ALERTS <= alerts
    assert alerts == tested


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("MirrorgateShadowDropRateHigh", "> 0.05", "> 0.5"),
        ("MirrorgateCandidateAborted", 'verdict="abort"', 'verdict="promote"'),
        ("MirrorgateGateNearLimit", "< 0.1", "< 0.01"),
    ],
)
def test_unit_tests_catch_a_broken_alert(
    promtool: str, tmp_path: Path, alert: str, old: str, new: str
) -> None:
    """The unit tests are not vacuous: a changed alert threshold makes them fail."""
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                assert old in rule["expr"]
                rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run_tool([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_operator_prometheusrule_matches_the_rules_file() -> None:
    target = regen_prometheusrule.TARGET
    assert target.read_text() == regen_prometheusrule.render(), (
        "deploy/kubernetes/prometheusrule.yaml is stale: "
        "python -m tests.deploy.regen_prometheusrule"
    )


def test_rules_read_only_agreed_metrics_and_labels() -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    for name in recorded:
        # Prometheus' naming convention for recording rules: level:metric:operations
        assert re.fullmatch(r"mirrorgate:[a-z0-9_]+:[a-z0-9_]+", name), name
    for rule in _rules():
        used = names(rule["expr"])
        unknown = used.metrics - SERIES_NAMES - recorded
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
        assert used.labels <= LABELS, used.labels - LABELS
        for label, op, value in used.matchers:
            if op == "=" and label in LABEL_VALUES:
                assert value in LABEL_VALUES[label], (label, value)


def test_alerts_say_what_to_do() -> None:
    for rule in _rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        assert len(rule["annotations"]["description"]) > 40


def test_sample_exposition_passes_promtool_check_metrics(promtool: str) -> None:
    text = generate_latest(sample_registry()).decode()
    result = run_tool([promtool, "check", "metrics"], input=text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sample_exposition_has_every_agreed_metric_with_its_type_and_labels() -> None:
    text = generate_latest(sample_registry()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for agreed in AGREED:
        # the parser names counters without their _total suffix
        family_name = (
            agreed.name.removesuffix("_total") if agreed.kind == "counter" else agreed.name
        )
        family = families[family_name]
        assert family.type == agreed.kind, agreed.name
        sample_labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert sample_labels == set(agreed.labels), agreed.name


def test_promtool_check_metrics_rejects_a_bad_exposition(promtool: str) -> None:
    """The exposition check is not vacuous: a counter without _total is reported."""
    bad = (
        "# HELP mirrorgate_requests Requests.\n"
        "# TYPE mirrorgate_requests counter\n"
        "mirrorgate_requests 1\n"
    )
    result = run_tool([promtool, "check", "metrics"], input=bad)
    assert result.returncode != 0
    assert "_total" in result.stdout + result.stderr
