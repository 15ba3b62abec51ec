"""Just enough PromQL reading to list the metric and label names a query uses.

Syntax itself is promtool's job (test_prometheus writes every query into a rule file and
runs ``promtool check rules``); this module answers "which series and labels does this
query read?", so dashboards and templates can be held to mirrorgate's agreed names.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_TEMPLATE = re.compile(r"\{\{[^}]*\}\}")  # Flagger/Go templates: {{ namespace }}
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")  # $job, ${job}, $__rate_interval
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")


@dataclass
class QueryNames:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


def substitute_templates(query: str, replacement: str = "x") -> str:
    """Grafana variables and Go templates replaced by a literal, so promtool can parse."""
    query = re.sub(r"\{\{\s*interval\s*\}\}", "1m", query)  # Flagger's analysis interval
    query = _TEMPLATE.sub(replacement, query)
    query = (
        query.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
    )
    return _GRAFANA_VAR.sub(replacement, query)


def names(query: str) -> QueryNames:
    out = QueryNames()
    text = _TEMPLATE.sub("x", query)
    text = _GRAFANA_VAR.sub("x", text)
    for body in _MATCHERS.findall(text):
        for label, op, value in _MATCHER.findall(body):
            out.labels.add(label)
            out.matchers.append((label, op, value[1:-1]))
    text = _MATCHERS.sub(" ", text)
    text = _STRING.sub(" ", text)
    for _, labels in _GROUPING.findall(text):
        out.labels.update(x.strip() for x in labels.split(",") if x.strip())
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word in KEYWORDS:
            continue  # a function or an aggregation, not a series
        out.metrics.add(word)
    return out


def promtool_syntax_errors(promtool: str, queries: dict[str, str], folder: Path) -> str:
    """Run every query through ``promtool check rules``; returns its output on failure."""
    rules = [
        {"record": f"check:query_{i}:syntax", "expr": substitute_templates(q)}
        for i, q in enumerate(queries.values())
    ]
    path = folder / "queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return ""
    return f"{list(queries)}\n{result.stdout}{result.stderr}"
