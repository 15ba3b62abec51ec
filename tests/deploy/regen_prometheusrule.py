"""Writes deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/mirrorgate-rules.yaml.

Run ``python -m tests.deploy.regen_prometheusrule`` after changing the rules; the test
suite fails while the two disagree.
"""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.helpers import DEPLOY

RULES = DEPLOY / "prometheus" / "mirrorgate-rules.yaml"
TARGET = DEPLOY / "kubernetes" / "prometheusrule.yaml"
HEADER = """# The rules of deploy/prometheus/mirrorgate-rules.yaml for the Prometheus Operator.
# Generated from that file; tests/deploy/test_prometheus.py fails when the two differ.
# Regenerate: python -m tests.deploy.regen_prometheusrule
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "mirrorgate",
            "labels": {"app.kubernetes.io/name": "mirrorgate", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
