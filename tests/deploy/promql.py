"""Just enough PromQL reading to list the metric and label names a query uses.

Syntax itself is promtool's job (test_prometheus writes every query into a rule file and
runs ``promtool check rules``); this module answers "which series and labels does this
query read?", so dashboards and templates can be held to mirrorgate's agreed names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
     "inf", "nan", "atan2"}
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
    query = _TEMPLATE.sub(replacement, query)
    query = query.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
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
