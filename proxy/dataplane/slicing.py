"""Slice keys and features of a request, and feature rules parsed without eval.

* Header slices: ``slices.headers: [platform]`` reads ``X-Mirrorgate-Slice-platform``.
* Parameter slices: ``slices.parameters: [tenant]`` reads the V2 request's
  ``parameters.tenant`` (strings, numbers and booleans; other values are ignored). When a
  key is both a header and a parameter, the request body's parameter wins.
* Features: ``features.names`` name the columns of one input tensor
  (``features.input``; default the request's first input), per row.
* Rules: ``slices.rules: {young: "age < 25"}`` gives slice ``young`` = ``"true"`` or
  ``"false"`` per row. Grammar: ``<name> <op> <value>`` with op one of
  ``< <= > >= == !=`` and value a number, a quoted string or a bare word. ``<name>`` is a
  feature or a header/parameter slice key. A row whose value is missing (or not a number
  for an ordering op) gets no slice for that rule rather than a wrong one.

Only configured keys become slices and values are truncated to ``MAX_VALUE_LEN``
characters: an unbounded set of slice keys would be an unbounded set of gates.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy.core.config import FeaturesSettings, SlicesSettings
from proxy.core.errors import ConfigError

SLICE_HEADER_PREFIX = "X-Mirrorgate-Slice-"
MAX_VALUE_LEN = 128

FeatureValue = float | int | str

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_RULE = re.compile(
    r"""^\s*(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)\s*
        (?P<op><=|>=|==|!=|<|>)\s*
        (?P<value>"[^"]*"|'[^']*'|[^\s"']+)\s*$""",
    re.VERBOSE,
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True, slots=True)
class Rule:
    """``name op value``; ``value`` is a float for numeric rules, else a string."""

    key: str
    name: str
    op: str
    value: float | str

    def __call__(self, values: Mapping[str, FeatureValue]) -> bool | None:
        """True/False, or None when the rule does not apply to these values."""
        got = values.get(self.name)
        if got is None:
            return None
        compare = _OPS[self.op]
        if isinstance(self.value, float):
            number = _as_number(got)
            if number is None or math.isnan(number):
                return None
            return bool(compare(number, self.value))
        return bool(compare(str(got), self.value))


def _as_number(value: FeatureValue) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    return float(text) if _NUMBER.match(text) else None


def parse_rule(key: str, text: str) -> Rule:
    """Parse ``"age < 25"``; raises ConfigError naming ``slices.rules.<key>``."""
    where = f"slices.rules.{key}"
    match = _RULE.match(text)
    if match is None:
        raise ConfigError(
            f"{where}: cannot parse {text!r}; expected '<name> <op> <value>' "
            f"with op one of {' '.join(sorted(_OPS))}"
        )
    name, op, raw = match["name"], match["op"], match["value"]
    value: float | str
    if raw[0] in "\"'":
        value = raw[1:-1]
    elif _NUMBER.match(raw):
        value = float(raw)
    else:
        value = raw
    if isinstance(value, str) and op not in ("==", "!="):
        raise ConfigError(f"{where}: {op} needs a number, got {raw!r}")
    return Rule(key=key, name=name, op=op, value=value)


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)[:MAX_VALUE_LEN]
    return None


def _feature_value(item: Any) -> FeatureValue:
    if isinstance(item, bytes | bytearray):
        return bytes(item).decode("utf-8", errors="replace")[:MAX_VALUE_LEN]
    if isinstance(item, str):
        return item[:MAX_VALUE_LEN]
    if isinstance(item, bool | np.bool_):
        return int(item)
    if isinstance(item, np.generic):
        item = item.item()
    if isinstance(item, int):
        return item
    return float(item)


@dataclass(frozen=True, slots=True)
class ParameterSlices:
    """The parameter part of :meth:`Slicer.request_slices` as a small picklable value:
    a pass-through pair carries it to the shadow worker (pickled per request), so it
    holds the configured keys only, not the whole :class:`Slicer`."""

    keys: tuple[str, ...]

    def __call__(self, parameters: Mapping[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in self.keys:
            text = _scalar_text(parameters.get(key))
            if text is not None:
                out[key] = text
        return out


class Slicer:
    """Computes a request's slices and each row's features from the configuration."""

    def __init__(self, slices: SlicesSettings, features: FeaturesSettings) -> None:
        self.header_keys = list(slices.headers)
        self.parameter_keys = list(slices.parameters)
        self.parameter_slices = ParameterSlices(tuple(self.parameter_keys))
        self.feature_input = features.input
        self.feature_names = list(features.names)
        self.rules = [parse_rule(key, text) for key, text in slices.rules.items()]
        known = {*self.feature_names, *self.header_keys, *self.parameter_keys}
        for rule in self.rules:
            if rule.name not in known:
                raise ConfigError(
                    f"slices.rules.{rule.key}: {rule.name!r} is not a feature "
                    f"(features.names) nor a slice key (slices.headers/parameters)"
                )

    def request_slices(
        self, headers: Mapping[str, str], parameters: Mapping[str, Any]
    ) -> dict[str, str]:
        """Slices that hold for the whole request (headers, then parameters)."""
        out: dict[str, str] = {}
        for key in self.header_keys:
            value = headers.get(SLICE_HEADER_PREFIX + key)
            if value is not None and value.strip():
                out[key] = value.strip()[:MAX_VALUE_LEN]
        for key in self.parameter_keys:
            text = _scalar_text(parameters.get(key))
            if text is not None:
                out[key] = text
        return out

    def row_features(
        self, inputs: Mapping[str, np.ndarray], row: int | None
    ) -> dict[str, FeatureValue]:
        """The configured feature columns of one row (``row=None``: the unbatched tensor)."""
        if not self.feature_names or not inputs:
            return {}
        name = self.feature_input or next(iter(inputs))
        tensor = inputs.get(name)
        if tensor is None:
            return {}
        values = (tensor if row is None else tensor[row]).reshape(-1)
        return {
            fname: _feature_value(values[j])
            for j, fname in enumerate(self.feature_names)
            if j < values.size
        }

    def rule_slices(
        self, features: Mapping[str, FeatureValue], request_slices: Mapping[str, str]
    ) -> dict[str, str]:
        if not self.rules:
            return {}
        values: dict[str, FeatureValue] = {**request_slices, **features}
        out: dict[str, str] = {}
        for rule in self.rules:
            result = rule(values)
            if result is not None:
                out[rule.key] = "true" if result else "false"
        return out
