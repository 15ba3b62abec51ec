"""Pinned cases as the control plane and the CLI show them, and the triage actions.

One place for both surfaces: ``POST /v1/pinned/{id}`` and ``mirrorgate pinned pin|dismiss``
parse the same action (``pin`` -> ``pinned``, ``dismiss`` -> ``dismissed``, ``reopen`` ->
``candidate``), need the same ``who`` and ``why``, and go through ``Store.triage`` — the
only way a case moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gates.records import Label, ModelResult
from proxy.core.errors import BadRequest
from storage.entities import PinnedCase, TriageEntry

ACTIONS: dict[str, str] = {"pin": "pinned", "dismiss": "dismissed", "reopen": "candidate"}


@dataclass(frozen=True, slots=True)
class TriageRequest:
    action: str
    status: str
    who: str
    why: str
    expected_label: Label = None
    score_tolerance: float | None = None


def parse_triage(body: Any) -> TriageRequest:
    """``{"action", "who", "why", "expected_label"?, "score_tolerance"?}``: 400 on faults."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object {'action', 'who', 'why', ...}")
    unknown = set(body) - {"action", "who", "why", "expected_label", "score_tolerance"}
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    action = body.get("action")
    if action not in ACTIONS:
        raise BadRequest(f"'action' must be one of {', '.join(ACTIONS)}")
    who, why = body.get("who"), body.get("why")
    if not isinstance(who, str) or not who.strip():
        raise BadRequest("'who' is required: the operator triaging this case")
    if not isinstance(why, str) or not why.strip():
        raise BadRequest("'why' is required: the reason, recorded in the triage history")
    label = body.get("expected_label")
    if label is not None and (
        isinstance(label, bool)
        or not isinstance(label, int | float | str)
        or (isinstance(label, float) and not math.isfinite(label))
    ):
        raise BadRequest("'expected_label' must be a class (int or string) or a finite number")
    tol = body.get("score_tolerance")
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol)
    ):
        raise BadRequest("'score_tolerance' must be a finite number >= 0")
    if tol is not None and tol < 0:
        raise BadRequest("'score_tolerance' must be >= 0")
    if action != "pin" and (label is not None or tol is not None):
        raise BadRequest("'expected_label' and 'score_tolerance' only go with action 'pin'")
    return TriageRequest(
        action=action,
        status=ACTIONS[action],
        who=who.strip(),
        why=why.strip(),
        expected_label=label,
        score_tolerance=None if tol is None else float(tol),
    )


def _output(value: Any) -> Any:
    if value is None:
        return None
    try:
        import numpy as np

        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    except (TypeError, ValueError):
        return None


def _side(result: ModelResult) -> dict[str, Any]:
    """One side of the evidence: output and error, plus the output's descriptors
    (``output_name``, ``datatype``, ``shape``) when they were recorded, as in a pair."""
    side: dict[str, Any] = {"output": _output(result.output), "error": result.error}
    if result.name is not None:
        side["output_name"] = result.name
    if result.datatype is not None:
        side["datatype"] = result.datatype
    if result.shape is not None:
        side["shape"] = list(result.shape)
    return side


def case_to_dict(case: PinnedCase, history: list[TriageEntry] | None = None) -> dict[str, Any]:
    """JSON view of a case: status, expectation, recurrence and its evidence."""
    ev = case.evidence
    body: dict[str, Any] = {
        "id": case.id,
        "task": case.task,
        "status": case.status,
        "rule": case.rule,
        "inputs_digest": case.inputs_digest,
        "expected_label": case.expected_label,
        "score_tolerance": case.score_tolerance,
        "first_seen": case.first_seen,
        "last_seen": case.last_seen,
        "recurrence_count": case.recurrence_count,
        "updated_at": case.updated_at,
        "rollout_id": case.rollout_id,
        "champion": case.champion.to_dict() if case.champion else None,
        "candidate": case.candidate.to_dict() if case.candidate else None,
        "evidence": {
            "request_id": ev.id,
            "ts": ev.ts,
            "label": ev.label,
            "slices": dict(ev.slices),
            "champion": _side(ev.champion),
            "candidate": _side(ev.candidate),
            "inputs": None
            if case.inputs is None
            else {k: list(v.shape) for k, v in sorted(case.inputs.items())},
        },
    }
    if history is not None:
        body["history"] = [
            {
                "actor": h.actor,
                "reason": h.reason,
                "from": h.from_status,
                "to": h.to_status,
                "expected_label": h.expected_label,
                "score_tolerance": h.score_tolerance,
                "ts": h.ts,
            }
            for h in history
        ]
    return body
