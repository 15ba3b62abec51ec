"""Gate presets: which families block, chosen by what kind of change the candidate is.

* ``retrained`` (the default): a retrained model is expected to move its outputs. The
  output contract, the labelled metric and slice non-inferiority checks, errors and
  latency block; tolerance (how far outputs moved) and output drift are evidence.
* ``equivalence``: a re-export, quantization or compilation of the same model should not
  move its outputs, so tolerance and output drift block as well.

A preset only fills in what the configuration leaves unsaid: an explicit
``tolerance.blocking`` (or any other key) always wins. Applied to the raw ``gates:``
mapping before validation (:class:`gates.settings.GatesSettings`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Preset = Literal["retrained", "equivalence"]
PRESETS: tuple[str, ...] = get_args(Preset)
DEFAULT_PRESET: Preset = "retrained"

_DEFAULTS: dict[str, dict[str, Any]] = {
    "retrained": {
        "tolerance": {"blocking": False},
        "drift": {"output": {"blocking": False}},
    },
    "equivalence": {
        "tolerance": {"blocking": True},
        "drift": {"output": {"blocking": True}},
    },
}

DESCRIPTIONS: dict[str, str] = {
    "retrained": "retrained candidate: contract, labelled metrics and slices, errors and "
    "latency block; tolerance and output drift are evidence",
    "equivalence": "equivalent re-export: contract, tolerance, output drift, labelled "
    "metrics and slices, errors and latency block",
}


def _under(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with ``defaults`` filled in where it has no value (recursively)."""
    out = dict(given)
    for key, value in defaults.items():
        have = out.get(key)
        if isinstance(value, dict) and (have is None or isinstance(have, dict)):
            out[key] = _under(value, have or {})
        elif key not in out:
            out[key] = value
    return out


def apply_preset(data: Any) -> Any:
    """The raw ``gates:`` mapping with its preset's defaults filled in."""
    if not isinstance(data, dict):
        return data
    preset = data.get("preset", DEFAULT_PRESET)
    if preset not in _DEFAULTS:
        return data  # the field's own validation names the bad value
    return _under(_DEFAULTS[preset], data)
