"""Store: rollouts, evaluations, decisions, pinned failures, baselines, sign-offs,
snapshots (SQLite + PostgreSQL)."""

from __future__ import annotations

import numpy as np
import pytest

from storage.entities import (
    Decision,
    GateEvaluation,
    GateSnapshot,
    HarvestedCase,
    SignOff,
)
from storage.errors import InvalidError, NotFoundError
from tests.storage.factories import CANDIDATE, CHAMPION, make_record


def test_rollout_lifecycle(store, rollout):
    got = store.get_rollout(rollout.id)
    assert (got.champion, got.candidate) == (CHAMPION, CANDIDATE)
    assert (got.config_digest, got.task, got.status, got.stage) == (
        "cfg",
        "classifier",
        "active",
        "shadow",
    )
    moved = store.update_rollout(rollout.id, stage="canary-10")
    assert moved.stage == "canary-10" and moved.ended_at is None
    ended = store.update_rollout(rollout.id, status="promoted", now=1234.0)
    assert (ended.status, ended.ended_at) == ("promoted", 1234.0)
    other = store.create_rollout(CHAMPION, None, now=ended.created_at + 10)
    assert other.candidate is None and other.id.startswith("r-")
    assert [r.id for r in store.list_rollouts()] == [other.id, rollout.id]
    assert [r.id for r in store.list_rollouts(status="promoted")] == [rollout.id]
    with pytest.raises(NotFoundError):
        store.get_rollout("nope")
    with pytest.raises(InvalidError):
        store.create_rollout(CHAMPION, rollout_id=rollout.id)
    with pytest.raises(InvalidError):
        store.update_rollout(rollout.id, status="exploded")


def test_pair_reads_by_time_and_label(store, rollout):
    records = [make_record(i, ts=100.0 + i, label=1 if i < 3 else None) for i in range(6)]
    assert store.write_pairs(rollout.id, records) == 6
    assert [r.id for r in store.iter_pairs(rollout.id, since=102, until=105)] == [
        "req-2",
        "req-3",
        "req-4",
    ]
    assert len(list(store.iter_pairs(rollout.id, labelled=True))) == 3
    assert len(list(store.iter_pairs(rollout.id, labelled=False, chunk=2))) == 3
    assert store.count_pairs() == 6


def test_gate_evaluations_and_latest(store, rollout):
    def ev(gate, slice_, status, ts, stat):
        return GateEvaluation(
            gate=gate,
            slice=slice_,
            status=status,
            statistic=stat,
            threshold=0.02,
            n=int(ts),
            method="mixture SPRT",
            ts=ts,
            confidence=0.95,
            details={"lower": stat - 0.01},
        )

    store.record_gate_evaluations(
        rollout.id,
        [
            ev("accuracy", "", "inconclusive", 10, 0.01),
            ev("accuracy", "platform=mobile", "inconclusive", 11, 0.02),
            ev("accuracy", "", "pass", 20, 0.005),
            ev("drift:age", "", "fail", 21, 0.3),
        ],
    )
    latest = store.gate_evaluations(rollout.id, latest_only=True)
    assert [(e.gate, e.slice, e.status) for e in latest] == [
        ("accuracy", "platform=mobile", "inconclusive"),
        ("accuracy", "", "pass"),
        ("drift:age", "", "fail"),
    ]
    history = store.gate_evaluations(rollout.id, gate="accuracy", slice="")
    assert [e.ts for e in history] == [10, 20]
    assert history[1].details == {"lower": pytest.approx(-0.005)}
    assert len(store.gate_evaluations(rollout.id, since=20)) == 2


def test_decisions_are_recorded_with_who(store, rollout):
    d = store.record_decision(
        rollout.id,
        Decision(
            verdict="promote",
            actor_kind="engine",
            actor="decision-engine",
            reason="all gates pass",
            ts=50.0,
            from_stage="shadow",
            to_stage="canary-10",
            evidence={"gates": [{"name": "accuracy", "status": "pass"}]},
        ),
    )
    assert d.id > 0
    store.record_decision(
        rollout.id,
        Decision(verdict="abort", actor_kind="operator", actor="alice", reason="manual", ts=60.0),
    )
    got = store.decisions(rollout.id)
    assert [(x.verdict, x.actor_kind, x.actor) for x in got] == [
        ("promote", "engine", "decision-engine"),
        ("abort", "operator", "alice"),
    ]
    assert got[0].evidence == {"gates": [{"name": "accuracy", "status": "pass"}]}
    with pytest.raises(InvalidError):
        store.record_decision(rollout.id, Decision("abort", "robot", "x", "", 1.0))  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.record_decision("nope", Decision("abort", "engine", "e", "", 1.0))


def _case(i: int, rule: str = "wrong-label") -> HarvestedCase:
    record = make_record(i, label=0, agree=False)
    assert record.inputs is not None
    return HarvestedCase(
        task="classifier",
        rule=rule,
        record=record,
        inputs=record.inputs,
        rollout_id="r-test",
        champion=CHAMPION,
        candidate=CANDIDATE,
    )


def test_pinned_dedup_by_digest_counts_recurrence(store, rollout):
    first = store.harvest(_case(1), now=10.0)
    assert first.created and first.recurrence_count == 1 and first.status == "candidate"
    again = _case(1, rule="disagreement")
    again.record.ts += 500
    second = store.harvest(again, now=20.0)
    assert (second.case_id, second.created, second.recurrence_count) == (first.case_id, False, 2)
    other = store.harvest(_case(2), now=30.0)
    assert other.created and other.case_id != first.case_id

    case = store.get_pinned(first.case_id)
    original = _case(1)
    assert case.rule == "wrong-label"  # the first evidence is kept
    assert case.recurrence_count == 2
    assert case.last_seen == original.record.ts + 500 and case.first_seen == original.record.ts
    assert case.champion == CHAMPION and case.candidate == CANDIDATE
    assert case.evidence.label == 0 and case.evidence.slices == original.record.slices
    assert case.inputs is not None and original.inputs is not None
    np.testing.assert_array_equal(case.inputs["x"], original.inputs["x"])
    np.testing.assert_array_equal(case.evidence.champion.output, original.record.champion.output)
    found = store.find_pinned("classifier", case.inputs_digest)
    assert found is not None and found.id == first.case_id


def test_triage_records_who_and_why(store, rollout):
    cid = store.harvest(_case(1)).case_id
    with pytest.raises(InvalidError, match="actor and a reason"):
        store.triage(cid, "pinned", actor="bob", reason="")
    pinned = store.triage(
        cid, "pinned", actor="bob", reason="real bug", score_tolerance=0.1, now=100.0
    )
    assert (pinned.status, pinned.expected_label, pinned.score_tolerance) == ("pinned", 0, 0.1)
    store.triage(
        cid, "pinned", actor="carol", reason="label was wrong", expected_label=1, now=200.0
    )
    store.triage(cid, "dismissed", actor="dave", reason="duplicate", now=300.0)
    assert store.get_pinned(cid).status == "dismissed"
    history = store.triage_history(cid)
    assert [(h.actor, h.from_status, h.to_status, h.expected_label) for h in history] == [
        ("harvest", None, "candidate", None),
        ("bob", "candidate", "pinned", 0),
        ("carol", "pinned", "pinned", 1),
        ("dave", "pinned", "dismissed", None),
    ]
    # Recurrence never moves a triaged case.
    store.harvest(_case(1))
    assert store.get_pinned(cid).status == "dismissed"
    assert [c.id for c in store.list_pinned(status="dismissed")] == [cid]
    assert store.list_pinned(status="pinned") == []
    with pytest.raises(NotFoundError):
        store.triage(9999, "pinned", actor="x", reason="y")
    unlabeled = _case(5)
    unlabeled.record.label = None
    uid = store.harvest(unlabeled).case_id
    with pytest.raises(InvalidError, match="expected label"):
        store.triage(uid, "pinned", actor="x", reason="y")


def test_baselines_move_only_deliberately(store, rollout):
    assert store.current_baseline("drift") is None
    with pytest.raises(InvalidError):
        store.save_baseline("drift", {"age": [1, 2]}, actor="", reason="")
    store.save_baseline("drift", {"age": [1, 2]}, actor="alice", reason="initial", now=1.0)
    store.save_baseline(
        "drift", {"age": [3, 4]}, actor="bob", reason="new season", rollout_id=rollout.id, now=2.0
    )
    current = store.current_baseline("drift")
    assert current is not None and current.data == {"age": [3, 4]} and current.actor == "bob"
    assert [b.reason for b in store.baseline_history("drift")] == ["initial", "new season"]


def test_signoffs(store, rollout):
    store.record_signoff(SignOff(rollout.id, "alice", "approve", "sha256:rep", "looks good", 5.0))
    assert store.signoffs(rollout.id) == [
        SignOff(rollout.id, "alice", "approve", "sha256:rep", "looks good", 5.0)
    ]
    with pytest.raises(NotFoundError):
        store.record_signoff(SignOff("nope", "alice", "approve", "", "", 5.0))


def test_gate_snapshots_upsert_per_replica_window(store, rollout):
    store.save_gate_snapshot(GateSnapshot(rollout.id, "replica-a", 0.0, 60.0, {"n": 1}, 61.0))
    store.save_gate_snapshot(GateSnapshot(rollout.id, "replica-b", 0.0, 60.0, {"n": 5}, 61.0))
    store.save_gate_snapshot(GateSnapshot(rollout.id, "replica-a", 0.0, 60.0, {"n": 2}, 62.0))
    store.save_gate_snapshot(GateSnapshot(rollout.id, "replica-a", 60.0, 120.0, {"n": 3}, 121.0))
    snaps = store.gate_snapshots(rollout.id)
    assert [(s.replica_id, s.window_start, s.state) for s in snaps] == [
        ("replica-a", 0.0, {"n": 2}),
        ("replica-b", 0.0, {"n": 5}),
        ("replica-a", 60.0, {"n": 3}),
    ]
    assert len(store.gate_snapshots(rollout.id, since=60.0)) == 1


def test_open_rollout_continues_the_active_one(store):
    first = store.open_rollout(CHAMPION, CANDIDATE, config_digest="cfg", task="t")
    again = store.open_rollout(CHAMPION, CANDIDATE, config_digest="cfg", task="t")
    assert again.id == first.id
    other = store.open_rollout(CHAMPION, CANDIDATE, config_digest="cfg-2", task="t")
    assert other.id != first.id
    store.update_rollout(first.id, status="aborted")
    fresh = store.open_rollout(CHAMPION, CANDIDATE, config_digest="cfg", task="t")
    assert fresh.id == first.id + "-2" and fresh.status == "active"


def test_model_info_of_an_identity():
    from proxy.protocol.base import ModelIdentity
    from storage.entities import ModelInfo

    identity = ModelIdentity(name="m", kind="onnx", digest="sha256:x", device="cuda")
    assert ModelInfo.of(identity) == ModelInfo("m", "onnx", "sha256:x", "cuda")


def test_rollouts_per_revision_and_the_newest_of_an_experiment(store):
    """The lifecycle's storage: one rollout per start of a revision (ids derived from the
    experiment and the revision), the newest whatever its status, and replicas starting
    together from the configuration joining one row."""
    start = {"config_digest": "d", "task": "t"}
    a = store.start_rollout(CHAMPION, CANDIDATE, revision="a", now=1.0, **start)
    assert a.extra["revision"] == "a" and a.status == "active"
    store.update_rollout(a.id, status="aborted")
    again = store.start_rollout(CHAMPION, CANDIDATE, revision="a", now=2.0, **start)
    assert again.id == f"{a.id}-2"  # a second judgement of the same revision
    joined = store.start_rollout(CHAMPION, CANDIDATE, revision="a", join_existing=True, **start)
    assert joined.id == again.id
    b = store.start_rollout(CHAMPION, CANDIDATE, revision="b", now=3.0, **start)
    assert b.id not in (a.id, again.id)
    newest = store.latest_rollout(CHAMPION, CANDIDATE, **start)
    assert newest is not None and newest.id == b.id
    store.update_rollout(b.id, status="aborted", extra={"closed_at": 4.0})
    newest = store.latest_rollout(CHAMPION, CANDIDATE, **start)
    assert newest is not None and newest.status == "aborted"  # an abort is resumed, not replaced
    assert newest.extra == {"revision": "b", "closed_at": 4.0}
    assert store.latest_rollout(CHAMPION, CANDIDATE, config_digest="other", task="t") is None
