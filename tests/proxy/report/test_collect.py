"""The storage-backed report: a document built from hand-written rows of a real SQLite store.

Small and exact (the demo's test covers the full path): the rows say what happened, the
document must say the same, validate against the schema, and not change when rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gates.records import ModelResult, PairRecord
from proxy.report.collect import build_document
from proxy.report.document import report_digest, validate_document
from storage.db import Database
from storage.entities import Decision, GateEvaluation, ModelInfo
from storage.migrate import upgrade
from storage.store import Store

T0 = 1_764_050_000.0
CONFIG_DIGEST = "ab" * 32
METHOD = "paired betting e-process: test"
ACC, MOBILE = "metric.accuracy", "platform=mobile"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    db = Database(f"sqlite:///{tmp_path / 'r.sqlite'}")
    upgrade(db)
    return Store(db)


def _pair(i: int, platform: str, label: int, champ: int, cand: int) -> PairRecord:
    def probs(k: int) -> np.ndarray:
        p = np.full(3, 0.1, dtype=np.float32)
        p[k] = 0.8
        return p

    return PairRecord(
        id=f"r-{i}",
        ts=T0 + i,
        champion=ModelResult(output=probs(champ), latency_ms=1.0 + i % 3),
        candidate=ModelResult(output=probs(cand), latency_ms=2.0 + i % 5),
        slices={"platform": platform},
        label=label,
    )


def _row(gate: str, slice_: str, status: str, stat: float, lo: float, hi: float, n: int, ts: float):
    return GateEvaluation(
        gate=gate,
        slice=slice_,
        status=status,
        statistic=stat,
        threshold=-0.02,
        n=n,
        method=METHOD,
        ts=ts,
        confidence=0.99,
        details={"reason": f"{status}: {gate}", "blocking": True, "lower": lo, "upper": hi,
                 "values": {"min_samples": 10}},
    )  # fmt: skip


def test_document_follows_the_rows_and_stops_at_the_verdict(store: Store) -> None:
    rollout = store.create_rollout(
        ModelInfo("champ", "onnx", "c" * 64),
        ModelInfo("cand", "onnx", "d" * 64),
        config_digest=CONFIG_DIGEST,
        now=T0,
    )
    rid = rollout.id
    # web: both right; mobile: the candidate wrong on every other row.
    pairs = [_pair(i, "web", 1, 1, 1) for i in range(0, 20)]
    pairs += [_pair(i, "mobile", 2, 2, 2 if i % 2 else 0) for i in range(20, 40)]
    store.write_pairs(rid, pairs)
    store.record_gate_evaluations(
        rid,
        [
            _row(ACC, "*", "INCONCLUSIVE", -0.1, -0.4, 0.2, 20, T0 + 20),
            _row(ACC, MOBILE, "INCONCLUSIVE", -0.5, -0.9, 0.1, 10, T0 + 20),
            _row(ACC, "*", "INCONCLUSIVE", -0.25, -0.4, 0.0, 40, T0 + 40),
            _row(ACC, MOBILE, "FAIL", -0.5, -0.8, -0.2, 20, T0 + 40),
            # After the verdict (pairs still in flight): not the evidence that decided.
            _row(ACC, MOBILE, "INCONCLUSIVE", -0.4, -0.7, 0.0, 22, T0 + 50),
        ],
    )  # fmt: skip
    store.record_decision(
        rid,
        Decision(
            verdict="abort",
            actor_kind="engine",
            actor="engine",
            reason="abort: metric.accuracy[platform=mobile] FAIL (statistic -0.5)",
            ts=T0 + 40,
            from_stage="shadow",
            to_stage="shadow",
            evidence={"action": "abort", "verdict": "abort", "pairs": 40, "labels": 40},
        ),
    )
    store.update_rollout(rid, status="aborted", now=T0 + 41)

    doc = build_document(store, rid)
    validate_document(doc)
    assert doc["verdict"]["verdict"] == "abort"
    assert doc["verdict"]["decided_at"] == {"pairs": 40, "labels": 40}
    assert doc["rollout"]["stage"] == "aborted"
    gates = {(g["name"], g["slice"]): g for g in doc["gates"]}
    assert gates[("metric.accuracy", "platform=mobile")]["status"] == "fail"
    assert gates[("metric.accuracy", "platform=mobile")]["min_n"] == 10
    series = {s["slice"]: s for s in doc["metric_series"]}
    assert [p["n"] for p in series["platform=mobile"]["points"]] == [10, 20]
    assert series["platform=mobile"]["points"][-1]["upper"] == -0.2
    rows = {r["value"]: r for r in doc["slice_table"]["rows"]}
    assert (rows["mobile"]["champion"], rows["mobile"]["candidate"]) == (1.0, 0.5)
    assert rows["web"]["candidate"] == 1.0 and rows["web"]["status"] == "inconclusive"
    assert rows["all"]["n"] == 40 and rows["mobile"]["labels"] == 20
    assert doc["counts"] == {
        "pairs": 40,
        "labels": 40,
        "champion_errors": 0,
        "candidate_errors": 0,
    }
    assert doc["latency"]["candidate"]["n"] == 40
    assert [t["event"] for t in doc["timeline"]] == ["start", "verdict"]
    # A function of the rows: rebuilt, same digest.
    assert report_digest(build_document(store, rid)) == report_digest(doc)


def test_a_rollout_without_its_config_digest_is_refused(store: Store) -> None:
    from proxy.core.errors import BadRequest

    rollout = store.create_rollout(
        ModelInfo("champ", "onnx", "c" * 64), ModelInfo("cand", "onnx", "d" * 64), now=T0
    )
    with pytest.raises(BadRequest, match="config digest"):
        build_document(store, rollout.id)


def test_slice_table_numbers_are_the_deciding_cells(store: Store) -> None:
    """The gate used 16 of the 20 labelled mobile pairs (say 4 came before the error clip
    or the class count was known): the table shows its n and its two accuracies, whose
    difference is the cell's statistic, not the 20 the pair summary would count."""
    rollout = store.create_rollout(
        ModelInfo("champ", "onnx", "c" * 64),
        ModelInfo("cand", "onnx", "d" * 64),
        config_digest=CONFIG_DIGEST,
        now=T0,
    )
    rid = rollout.id
    pairs = [_pair(i, "mobile", 2, 2, 2 if i % 2 else 0) for i in range(20)]
    store.write_pairs(rid, pairs)
    row = _row(ACC, MOBILE, "FAIL", -0.5625, -0.8, -0.2, 16, T0 + 20)
    row.details["values"] = {"min_samples": 10, "champion": 1.0, "candidate": 0.4375}
    store.record_gate_evaluations(rid, [row])
    doc = build_document(store, rid)
    validate_document(doc)
    mobile = next(r for r in doc["slice_table"]["rows"] if r["value"] == "mobile")
    assert mobile["labels"] == 16
    assert (mobile["champion"], mobile["candidate"]) == (1.0, 0.4375)
    assert mobile["difference"] == mobile["candidate"] - mobile["champion"] == -0.5625
