"""Build a rollout's report document (``schema.json``) from what storage recorded.

Everything comes from the rollout's rows: the rollout itself, its pairs (counts, per-slice
accuracy, latency), the gate evaluations the proxy persisted at every look (latest status
of each gate, and each metric's estimate with its anytime-valid band over time), the
decisions (timeline, verdict), the harvested failures and the sign-offs. No wall-clock
field: building it twice from the same rows gives the same digest, so a sign-off keeps
matching until new evidence is recorded.

The optional config adds what the rows do not carry: the stage plan, the minimum sample
sizes and the drift thresholds. It is used only when its digest is the rollout's own (a
different config would describe a different rollout).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gates.records import PairRecord
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import BadRequest
from proxy.report.document import SCHEMA_VERSION
from proxy.report.sections import collect_versions, latency_section
from storage.entities import Decision, GateEvaluation, PinnedCase, Rollout
from storage.store import Store

AGGREGATE = "*"
MAX_SERIES_POINTS = 120
MAX_HARVESTED_LISTED = 50
IDENTITY_KINDS = ("onnx", "torch", "http")
# The slice table's metric: the first paired metric gate found.
PRIMARY_METRICS = ("metric.accuracy", "metric.mae", "metric.rmse")
SERIES_METRICS = {
    "metric.accuracy": "accuracy: candidate - champion",
    "metric.high_confidence_error": "high-confidence error rate: champion - candidate",
    "metric.mae": "MAE ratio: candidate / champion",
    "metric.rmse": "RMSE ratio: candidate / champion",
}
_STATUS = {"PASS": "pass", "INCONCLUSIVE": "inconclusive", "FAIL": "fail"}
_TERMINAL = ("promote", "abort")
_ENDED = {"aborted": "aborted", "promoted": "promoted"}


def _num(value: Any, digits: int = 6) -> float | None:
    """A finite float rounded to ``digits`` significant digits (compact, stable JSON)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _slice_name(s: str) -> str:
    return "all" if s in (AGGREGATE, "") else s


def _status(s: str) -> str:
    return _STATUS.get(s.upper(), "inconclusive")


def _details(e: GateEvaluation) -> dict[str, Any]:
    return e.details or {}


def _values(e: GateEvaluation) -> dict[str, Any]:
    values = _details(e).get("values")
    return values if isinstance(values, dict) else {}


@dataclass
class _SliceStats:
    pairs: int = 0
    labels: int = 0
    champion_right: int = 0
    candidate_right: int = 0
    scored: int = 0


@dataclass
class _PairSummary:
    pairs: int = 0
    labels: int = 0
    champion_errors: int = 0
    candidate_errors: int = 0
    newest: float = 0.0
    champion_ms: list[float] = field(default_factory=list)
    candidate_ms: list[float] = field(default_factory=list)
    slices: dict[tuple[str, str], _SliceStats] = field(
        default_factory=lambda: defaultdict(_SliceStats)
    )


def _predicted(output: Any) -> int | None:
    arr = None if output is None else np.asarray(output, dtype=np.float64)
    if arr is None or arr.ndim != 1 or arr.size < 2 or not np.isfinite(arr).all():
        return None
    return int(np.argmax(arr))


def _right(output: Any, label: Any) -> bool | None:
    predicted = _predicted(output)
    if predicted is None or label is None or isinstance(label, bool | list):
        return None
    if isinstance(label, int):
        return predicted == label
    return str(predicted) == str(label)


def summarize_pairs(pairs: Iterable[PairRecord], *, cutoff: float | None = None) -> _PairSummary:
    """One pass over the rollout's pairs: counts, latency samples, per-slice accuracy
    (the latter of the pairs up to ``cutoff``: the slice table is the decision's evidence)."""
    out = _PairSummary()
    for r in pairs:
        out.pairs += 1
        out.newest = max(out.newest, float(r.ts))
        labelled = r.label is not None
        out.labels += labelled
        out.champion_errors += r.champion.error is not None
        out.candidate_errors += r.candidate.error is not None
        if r.champion.latency_ms is not None:
            out.champion_ms.append(float(r.champion.latency_ms))
        if r.candidate.latency_ms is not None:
            out.candidate_ms.append(float(r.candidate.latency_ms))
        champ = _right(r.champion.output, r.label) if labelled else None
        cand = _right(r.candidate.output, r.label) if labelled else None
        if cutoff is not None and r.ts > cutoff:
            continue
        cells = [("all", "all"), *sorted(r.slices.items())]
        for key in cells:
            s = out.slices[key]
            s.pairs += 1
            s.labels += labelled
            if champ is not None and cand is not None:
                s.scored += 1
                s.champion_right += champ
                s.candidate_right += cand
    return out


def build_document(
    store: Store,
    rollout_id: str,
    *,
    config: MirrorgateConfig | None = None,
    config_source: str | None = None,
) -> dict[str, Any]:
    """The report document of one rollout (not yet validated; ``signoffs`` included)."""
    rollout = store.get_rollout(rollout_id)
    if rollout.candidate is None:
        raise BadRequest(f"rollout {rollout_id} has no candidate: there is nothing to compare")
    if config is not None and rollout.config_digest and config.digest() != rollout.config_digest:
        config = None  # another rollout's settings: the rows alone speak
    decisions = store.decisions(rollout_id)
    terminal = _terminal(decisions)
    # An ended rollout shows the evidence that decided it, as replay does: the gates keep
    # updating on the pairs still in flight at the verdict, and a betting e-process that
    # crossed its threshold may drift back, but the decision was taken at the crossing.
    cutoff = terminal.ts if terminal is not None else None
    summary = summarize_pairs(store.iter_pairs(rollout_id), cutoff=cutoff)
    history = store.gate_evaluations(rollout_id)
    if cutoff is not None:
        history = [e for e in history if e.ts <= cutoff]
    latest = _latest(history)
    harvested = [c for c in store.list_pinned() if c.rollout_id == rollout_id]
    pinned_total = len(store.list_pinned(status="pinned"))
    as_of = max(
        [rollout.created_at, summary.newest]
        + [d.ts for d in decisions]
        + ([history[-1].ts] if history else [])
    )
    gates = [_gate(e, config) for e in latest if e.gate != "pinned"]
    pinned_rows = [e for e in latest if e.gate == "pinned"]
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "rollout": _rollout(rollout, config, as_of),
        "verdict": _verdict(decisions, latest),
        "models": {
            "champion": _identity(rollout.champion.to_dict()),
            "candidate": _identity(rollout.candidate.to_dict()),
        },
        "config": _config(rollout, config, config_source),
        "versions": collect_versions(),
        "counts": {
            "pairs": summary.pairs,
            "labels": summary.labels,
            "champion_errors": summary.champion_errors,
            "candidate_errors": summary.candidate_errors,
        },
        "gates": gates,
        "metric_series": _series(history),
        "slice_table": _slice_table(latest, summary, config),
        "drift": _drift(latest, config),
        "latency": latency_section(summary.champion_ms, summary.candidate_ms),
        "pinned": _pinned(pinned_rows, harvested, pinned_total, config),
        "timeline": _timeline(rollout, decisions, config),
        "signoffs": [
            {
                "reviewer": s.reviewer,
                "decision": s.decision,
                "note": s.note,
                "ts": s.ts,
                "digest": s.report_digest,
            }
            for s in store.signoffs(rollout_id)
        ],
    }
    return doc


# ----------------------------------------------------------------------------- sections


def _latest(history: Sequence[GateEvaluation]) -> list[GateEvaluation]:
    """The newest row of each (gate, slice), in the order gates were first seen."""
    newest: dict[tuple[str, str], GateEvaluation] = {}
    for e in history:  # time order: later rows replace earlier ones
        newest[(e.gate, e.slice)] = e
    return list(newest.values())


def _rollout(rollout: Rollout, config: MirrorgateConfig | None, as_of: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rollout.id,
        # An ended rollout's stage is its outcome (the timeline says where it ended).
        "stage": _ENDED.get(rollout.status, rollout.stage or "shadow"),
        "started_at": rollout.created_at,
        "ended_at": rollout.ended_at,
        "as_of": as_of,
    }
    if config is not None:
        out["plan"] = [s.name for s in config.rollout.stages]
        out["preset"] = config.gates.preset
    return out


def _identity(info: dict[str, str]) -> dict[str, Any]:
    kind = info.get("kind", "")
    out: dict[str, Any] = {
        "name": info.get("name") or "unnamed",
        # Imported rollouts may carry another kind (a file); the schema knows the served ones.
        "kind": kind if kind in IDENTITY_KINDS else "http",
        "digest": info.get("digest") or "unknown",
        "device": info.get("device") or "cpu",
    }
    if kind not in IDENTITY_KINDS:
        out["extra"] = {"recorded_kind": kind or "unknown"}
    return out


def _config(
    rollout: Rollout, config: MirrorgateConfig | None, source: str | None
) -> dict[str, Any]:
    digest = rollout.config_digest
    if not (len(digest) == 64 and not digest.strip("0123456789abcdef")):
        raise BadRequest(
            f"rollout {rollout.id} recorded no config digest (imported pairs?): a validation "
            "pack needs the configuration the evidence was gathered under"
        )
    out: dict[str, Any] = {"digest": digest}
    if source is not None:
        out["source"] = source if config is not None else f"{source} (not this rollout's config)"
    return out


def _terminal(decisions: Sequence[Decision]) -> Decision | None:
    return next(
        (d for d in reversed(decisions) if (d.evidence or {}).get("action") in _TERMINAL), None
    )


def _verdict(decisions: Sequence[Decision], latest: Sequence[GateEvaluation]) -> dict[str, Any]:
    terminal = _terminal(decisions)
    if terminal is not None:
        evidence = terminal.evidence or {}
        action = str(evidence["action"])
        by = "" if terminal.actor_kind == "engine" else f"{action} by {terminal.actor}: "
        decided = None
        if isinstance(evidence.get("pairs"), int) and isinstance(evidence.get("labels"), int):
            decided = {"pairs": evidence["pairs"], "labels": evidence["labels"]}
        return {
            "verdict": action,
            "reason": by + terminal.reason,
            "ts": terminal.ts,
            "decided_at": decided,
        }
    pending = [
        e
        for e in latest
        if _details(e).get("blocking", True)
        and not _details(e).get("insufficient", False)
        and _status(e.status) != "pass"
    ]
    if pending:
        first = pending[0]
        reason = f"continue: waiting for {_label(first)}: {_details(first).get('reason', '')}"
    elif latest:
        reason = "continue: no terminal decision recorded yet"
    else:
        reason = "continue: no gate evaluation recorded yet"
    return {
        "verdict": "continue",
        "reason": reason,
        "ts": latest[-1].ts if latest else None,
        "decided_at": None,
    }


def _label(e: GateEvaluation) -> str:
    return e.gate if e.slice in (AGGREGATE, "") else f"{e.gate}[{e.slice}]"


def _min_n(e: GateEvaluation, config: MirrorgateConfig | None) -> int | None:
    recorded = _values(e).get("min_samples")
    if isinstance(recorded, int) and recorded >= 0:
        return recorded  # what the gate itself applied to this cell
    if config is None:
        return None
    g = config.gates
    family = e.gate.split(".")[0]
    on_slice = e.slice not in (AGGREGATE, "") and not e.slice.startswith("class=")
    if on_slice and family in ("metric", "tolerance"):
        return g.slices.min_samples
    by_family = {
        "metric": g.metric.min_samples,
        "tolerance": g.tolerance.min_samples,
        "latency": g.latency.min_samples,
        "errors": g.errors.min_samples,
    }
    if e.gate == "drift.output":
        return g.drift.output.min_samples
    return by_family.get(family)


def _gate(e: GateEvaluation, config: MirrorgateConfig | None) -> dict[str, Any]:
    details = _details(e)
    confidence = _num(e.confidence)
    out: dict[str, Any] = {
        "name": e.gate,
        "slice": _slice_name(e.slice),
        "kind": e.gate.split(".")[0],
        "blocking": bool(details.get("blocking", True)),
        "status": _status(e.status),
        "statistic": _num(e.statistic),
        "threshold": _num(e.threshold),
        "n": max(int(e.n), 0),
        # A point estimate (evidence only) or a cell still waiting has no confidence.
        "confidence": confidence if confidence is not None and 0 < confidence <= 1 else None,
        "method": e.method or "unknown",
        "reason": str(details.get("reason", "")),
    }
    min_n = _min_n(e, config)
    if min_n is not None:
        out["min_n"] = min_n
    return out


def _series(history: Sequence[GateEvaluation]) -> list[dict[str, Any]]:
    """Each blocking paired metric's estimate and anytime-valid band at every look."""
    points: dict[tuple[str, str], list[dict[str, Any]]] = {}
    meta: dict[tuple[str, str], GateEvaluation] = {}
    for e in history:
        if e.gate not in SERIES_METRICS or not _details(e).get("blocking", True):
            continue
        d = _details(e)
        estimate, lower, upper = _num(e.statistic), _num(d.get("lower")), _num(d.get("upper"))
        if estimate is None or lower is None or upper is None or e.n <= 0:
            continue
        key = (e.gate, e.slice)
        meta[key] = e
        series = points.setdefault(key, [])
        point = {"n": int(e.n), "ts": e.ts, "estimate": estimate, "lower": lower, "upper": upper}
        if series and series[-1]["n"] == point["n"]:
            series[-1] = point  # no new labels since the last look: keep the latest
        else:
            series.append(point)
    out = []
    for key, pts in points.items():
        e = meta[key]
        confidence = _num(e.confidence)
        out.append(
            {
                "gate": e.gate,
                "slice": _slice_name(e.slice),
                "metric": SERIES_METRICS[e.gate],
                "threshold": _num(e.threshold),
                "confidence": confidence if confidence is not None and 0 < confidence < 1 else 0.95,
                "points": _thin(pts, MAX_SERIES_POINTS),
            }
        )
    return out


def _thin(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if len(points) <= limit:
        return points
    keep = np.unique(np.linspace(0, len(points) - 1, limit).round().astype(int))
    return [points[i] for i in keep]


def _slice_table(
    latest: Sequence[GateEvaluation], summary: _PairSummary, config: MirrorgateConfig | None
) -> dict[str, Any]:
    present = {e.gate for e in latest}
    gate = next((g for g in PRIMARY_METRICS if g in present), None)
    metric = gate.split(".", 1)[1] if gate else "accuracy"
    cells = {e.slice: e for e in latest if e.gate == gate}
    margin = None
    if config is not None and gate is not None:
        margin = getattr(config.gates.metric, metric).margin
    rows = []
    keys = sorted(summary.slices, key=lambda k: (k != ("all", "all"), k))
    for key, value in keys:
        stats = summary.slices[(key, value)]
        cell = cells.get(AGGREGATE if key == "all" else f"{key}={value}")
        d = _details(cell) if cell is not None else {}
        scored = stats.scored if metric == "accuracy" else 0
        champion = stats.champion_right / scored if scored else None
        candidate = stats.candidate_right / scored if scored else None
        v = _values(cell) if cell is not None else {}
        if cell is not None and _num(v.get("champion")) is not None:
            # The deciding cell's own numbers: the same n for both models and the
            # difference (pairs the gate used, not every labelled pair of the slice).
            champion, candidate = _num(v.get("champion")), _num(v.get("candidate"))
        row: dict[str, Any] = {
            "key": key,
            "value": value,
            "n": stats.pairs,
            "labels": cell.n if cell is not None else stats.labels,
            "champion": _num(champion),
            "candidate": _num(candidate),
            "difference": _num(cell.statistic) if cell is not None else None,
            "lower": _num(d.get("lower")),
            "upper": _num(d.get("upper")),
            "status": _status(cell.status) if cell is not None else "inconclusive",
        }
        if row["difference"] is None and champion is not None and candidate is not None:
            row["difference"] = _num(candidate - champion)
        min_n = _min_n(cell, config) if cell is not None else None
        if min_n is not None:
            row["min_n"] = min_n
        rows.append(row)
    return {"metric": metric, "margin": margin, "rows": rows}


def _drift(latest: Sequence[GateEvaluation], config: MirrorgateConfig | None) -> list[Any]:
    out: list[dict[str, Any]] = []
    for e in latest:
        values = _values(e)
        if e.gate == "drift.output":
            psi = _num(values.get("psi"))
            # the output kind decides what the drift coordinates are (docs/gates.md)
            kind = values.get("kind")
            out.append(
                {
                    "feature": f"output ({kind or 'class shares'})",
                    "kind": "output",
                    "method": e.method,
                    "statistic": _num(e.statistic),
                    "p_value": None,
                    "e_value": None,
                    "alpha": _alpha(values),
                    "psi": psi,
                    "psi_threshold": config.gates.drift.output.psi if config is not None else None,
                    "n_reference": int(e.n),
                    "n_current": int(e.n),
                    "status": _status(e.status),
                    "reason": str(_details(e).get("reason", "")),
                }
            )
        elif e.gate.startswith("drift.input."):
            p_fixed = _num(values.get("p_fixed_sample"))
            out.append(
                {
                    "feature": e.gate.removeprefix("drift.input."),
                    "kind": "input",
                    "method": e.method + " (p-value: fixed-sample chi-square, for reference)",
                    "statistic": _num(e.statistic),
                    "p_value": p_fixed if p_fixed is not None and 0 <= p_fixed <= 1 else None,
                    "e_value": None,
                    "psi": _num(e.statistic),
                    "psi_threshold": _num(e.threshold),
                    "n_reference": int(values.get("reference_n") or 0),
                    "n_current": int(e.n),
                    "status": _status(e.status),
                    "reason": str(_details(e).get("reason", "")),
                }
            )
    return out


def _alpha(values: dict[str, Any]) -> float | None:
    alpha = _num(values.get("alpha"))
    return alpha if alpha is not None and 0 < alpha < 1 else None


def _output(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.dtype == object:  # BYTES: strings
        return [str(x) for x in value.ravel()]
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return _num(arr)
    return [_num(x) or 0.0 for x in arr.ravel()]


def _prediction(output: Any) -> Any:
    """What a model answered, as a person reads it: a class id (argmax of scores, or the
    class index itself), a number (regression), a string; a vector stays a vector."""
    if output is None:
        return None
    if isinstance(output, np.ndarray) and output.dtype == object:
        return " ".join(str(x) for x in output.ravel())
    arr = np.asarray(output, dtype=np.float64).ravel()
    if arr.size == 0 or not np.isfinite(arr).all():
        return None
    if arr.size == 1:
        v = float(arr[0])
        return int(v) if v.is_integer() else _num(v)
    if (arr >= -1e-9).all() and abs(float(arr.sum()) - 1.0) <= 1e-3:
        return int(np.argmax(arr))
    return None  # logits, multi-label, vectors: the output column shows them


def _wrong(prediction: Any, label: Any, config: MirrorgateConfig | None) -> bool | None:
    if prediction is None or label is None or isinstance(label, bool):
        return None
    if isinstance(prediction, str) or isinstance(label, str):
        return str(prediction) != str(label)
    if isinstance(label, list):
        return None
    if isinstance(prediction, int) and isinstance(label, int):
        return prediction != label
    h = config.gates.harvest if config is not None else None
    atol, rtol = (h.regression_atol, h.regression_rtol) if h is not None else (0.0, 0.1)
    return abs(float(prediction) - float(label)) > atol + rtol * abs(float(label))


def _predictions(
    champion: Any, candidate: Any, label: Any, config: MirrorgateConfig | None
) -> dict[str, Any]:
    """Each model's predicted class / value and which of them was wrong."""
    pc, pa = _prediction(champion), _prediction(candidate)
    wc, wa = _wrong(pc, label, config), _wrong(pa, label, config)
    if wc is None or wa is None:
        wrong = "unknown" if label is not None else "no label"
    else:
        wrong = {(True, True): "both", (True, False): "champion", (False, True): "candidate"}.get(
            (wc, wa), "neither"
        )
    return {"champion_prediction": pc, "candidate_prediction": pa, "wrong": wrong}


def _pinned(
    rows: Sequence[GateEvaluation],
    harvested: Sequence[PinnedCase],
    pinned_total: int,
    config: MirrorgateConfig | None,
) -> dict[str, Any]:
    gate = _gate(rows[-1], config) if rows else None
    if gate is not None and pinned_total == 0 and gate["n"] == 0:
        gate = None  # no pinned set: the gate had nothing to check
    listed = []
    for c in harvested[:MAX_HARVESTED_LISTED]:
        ev = c.evidence
        label = ev.label
        if isinstance(label, float) and not math.isfinite(label):
            label = None
        listed.append(
            {
                "id": ev.id or str(c.id),
                "ts": c.first_seen,
                "rule": c.rule or "unknown",
                "state": c.status,
                "slices": {str(k): str(v) for k, v in ev.slices.items()},
                "label": label,
                "champion_output": _output(ev.champion.output),
                "candidate_output": _output(ev.candidate.output),
                **_predictions(ev.champion.output, ev.candidate.output, label, config),
                "inputs_digest": c.inputs_digest,
                # No recurrence count: it is global to the case and keeps rising with
                # later rollouts' traffic, so a finished rollout's report (and the digest
                # a reviewer signed) would change after the fact.
            }
        )
    return {
        "gate": gate,
        "harvested_total": len(harvested),
        "pinned_total": pinned_total,
        "harvested": listed,
    }


def _timeline(
    rollout: Rollout, decisions: Sequence[Decision], config: MirrorgateConfig | None
) -> list[dict[str, Any]]:
    first = config.rollout.stages[0].name if config is not None else "shadow"
    out: list[dict[str, Any]] = [
        {
            "ts": rollout.created_at,
            "event": "start",
            "verdict": None,
            "stage_from": None,
            "stage_to": first,
            "reason": f"rollout started: champion {rollout.champion.name}, candidate "
            f"{rollout.candidate.name if rollout.candidate else '-'}",
            "who": "engine",
        }
    ]
    for d in decisions:
        evidence = d.evidence or {}
        action = str(evidence.get("action") or d.verdict)
        verdict = evidence.get("verdict", d.verdict)
        entry: dict[str, Any] = {
            "ts": d.ts,
            "verdict": verdict if verdict in ("continue", "promote", "abort") else None,
            "stage_from": d.from_stage,
            "stage_to": d.to_stage,
            "reason": d.reason,
            "who": d.actor or "engine",
        }
        if d.actor_kind == "operator":
            entry["event"] = "operator"
            entry["action"] = action
        elif action == "advance":
            entry["event"] = "stage"
        elif action in _TERMINAL:
            entry["event"] = "verdict"
        else:
            entry["event"] = "evaluation"
            entry["action"] = action
        out.append(entry)
    return out
