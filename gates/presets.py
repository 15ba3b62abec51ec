"""Gate presets: which families block, chosen by what kind of change the candidate is.

* ``retrained`` (the default): a retrained model is expected to move its outputs. The
  output contract, the labelled correctness checks (accuracy overall and per slice,
  per-class recall), errors and latency block; the score-shape checks are evidence:
  tolerance (how far outputs moved), output drift and the high-confidence error rate (a
  retrained model is calibrated differently by construction: replaying the demo's better
  candidate, it is the one check that holds it back, docs/gates.md "Presets").
* ``equivalence``: a re-export, quantization or compilation of the same model should not
  move its outputs, so tolerance, output drift and the high-confidence error rate block
  as well.

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
        "metric": {"high_confidence_error": {"blocking": False}},
    },
    "equivalence": {
        "tolerance": {"blocking": True},
        "drift": {"output": {"blocking": True}},
        "metric": {"high_confidence_error": {"blocking": True}},
    },
}

DESCRIPTIONS: dict[str, str] = {
    "retrained": "retrained candidate: contract, accuracy (overall and per slice), recall, "
    "errors and latency block; tolerance, output drift and high-confidence errors are evidence",
    "equivalence": "equivalent re-export: contract, tolerance, output drift, accuracy, "
    "recall, high-confidence errors, slices, errors and latency block",
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
