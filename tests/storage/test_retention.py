"""Retention purge (SQLite + PostgreSQL): old rows go, the audit trail stays."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from storage.entities import Decision, GateEvaluation, GateSnapshot, HarvestedCase, LabelEntry
from storage.recorder import SqlRecorder
from tests.storage.factories import CANDIDATE, CHAMPION, eventually, make_record
from tests.storage.test_recorder import settings

DAY = 86_400.0
NOW = 1_800_000_000.0


def _fill(store, rollout):
    old = [make_record(i, ts=NOW - 10 * DAY + i, inputs=False) for i in range(5)]
    new = [make_record(100 + i, ts=NOW - 1 * DAY + i, inputs=False) for i in range(5)]
    store.write_pairs(rollout.id, old + new)
    evidence = make_record(0, ts=NOW - 10 * DAY, label=0)
    store.harvest(
        HarvestedCase(
            task="classifier",
            rule="wrong-label",
            record=evidence,
            inputs=evidence.inputs,
            rollout_id=rollout.id,
            champion=CHAMPION,
            candidate=CANDIDATE,
        ),
        now=NOW - 10 * DAY,
    )
    case = store.list_pinned()[0]
    store.triage(
        case.id, "pinned", actor="alice", reason="bug", expected_label=1, now=NOW - 9 * DAY
    )
    store.record_decision(rollout.id, Decision("abort", "engine", "engine", "old", NOW - 10 * DAY))
    store.record_gate_evaluations(
        rollout.id,
        [
            GateEvaluation("acc", "pass", 0.1, 0.2, 10, "m", NOW - 10 * DAY),
            GateEvaluation("acc", "pass", 0.1, 0.2, 10, "m", NOW - DAY),
        ],
    )
    store.save_gate_snapshot(
        GateSnapshot(rollout.id, "a", NOW - 10 * DAY, NOW - 10 * DAY + 60, {}, NOW - 10 * DAY)
    )
    store.add_labels(
        [
            LabelEntry("req-1", 1, ts=NOW - 10 * DAY, received_at=NOW - 10 * DAY),  # joined
            LabelEntry("lost", 1, ts=NOW - 10 * DAY, received_at=NOW - 10 * DAY),  # orphan
            LabelEntry("waiting", 1, ts=NOW - 60, received_at=NOW - 60),  # pending
        ],
        now=NOW - 10 * DAY,
    )


def test_purge_by_age_keeps_the_audit_trail(store, rollout):
    _fill(store, rollout)
    result = store.purge(retention_days=7, retention_rows=None, label_window_s=DAY, now=NOW)
    assert (result.pairs, result.gate_evaluations, result.gate_snapshots) == (5, 1, 1)
    assert result.orphaned_labels == 1
    assert result.labels == 2  # the old joined and the old orphaned label
    assert sorted(r.id for r in store.iter_pairs(rollout.id)) == [
        f"req-{100 + i}" for i in range(5)
    ]
    # Never purged: pinned failures (with evidence), their triage, decisions, rollouts.
    [case] = store.list_pinned()
    assert case.status == "pinned" and case.inputs_digest
    assert len(store.triage_history(case.id)) == 2
    assert len(store.decisions(rollout.id)) == 1
    assert store.get_rollout(rollout.id).id == rollout.id
    # A pending label inside its window is never purged.
    assert [e.request_id for e in store.pending_labels()] == ["waiting"]


def test_purge_by_row_limit_keeps_the_newest(store, rollout):
    _fill(store, rollout)
    result = store.purge(retention_days=None, retention_rows=3, label_window_s=DAY, now=NOW)
    assert result.pairs == 7
    assert [r.id for r in store.iter_pairs(rollout.id)] == ["req-102", "req-103", "req-104"]
    assert len(store.list_pinned()) == 1 and len(store.decisions(rollout.id)) == 1


def test_no_limits_purges_nothing(store, rollout):
    _fill(store, rollout)
    result = store.purge(retention_days=None, retention_rows=None, label_window_s=DAY, now=NOW)
    assert result.total == 0 and store.count_pairs() == 10


async def test_the_recorder_purges_periodically(db, store, rollout):
    store.write_pairs(
        rollout.id, [make_record(i, ts=NOW - 30 * DAY, inputs=False) for i in range(4)]
    )
    s = settings(str(db.url), retention_days=7, purge_interval_s=0.05)
    rec = SqlRecorder(db, rollout.id, s, registry=CollectorRegistry(), clock=lambda: NOW)
    await rec.start()
    rec.submit(make_record(50, ts=NOW, inputs=False))
    await eventually(lambda: store.count_pairs() == 1, what="the periodic purge")
    await rec.aclose()
    assert [r.id for r in store.iter_pairs(rollout.id)] == ["req-50"]
