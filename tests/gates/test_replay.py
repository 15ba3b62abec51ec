"""Replay = the online path on recorded traffic: same runner, engine, gates and cadence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gates.engine import RolloutEngine
from gates.join import LabelEvent
from gates.replay import replay
from gates.runner import GateRunner
from gates.settings import GatesSettings
from gates.simulate import Scenario, records
from tests.gates.conftest import plan

STAGE = {"min_pairs": 500, "min_labels": 300, "min_duration_s": 5.0, "max_duration_s": None}
PLAN = plan({"name": "shadow", **STAGE}, {"name": "canary", **STAGE}, every=200, every_s=30.0)
GATES = GatesSettings.model_validate(
    {
        "metric": {"min_samples": 100},
        "slices": {"keys": ["platform"], "min_samples": 150},
        "tolerance": {
            "min_samples": 100,
            "flip": {"max_rate": 0.25},
            "shift": {"max_rate": 0.25},
        },
        "latency": {"min_samples": 100},
        "errors": {"min_samples": 100},
    }
)


def online(recs, labels, seed: int):
    """Pairs arrive in uneven batches, labels at their time; a timer ticks after each."""
    rng = np.random.default_rng(seed)
    recs = sorted(recs, key=lambda r: r.ts)
    engine = RolloutEngine(GATES, PLAN, start_ts=recs[0].ts)
    runner = GateRunner(engine)
    events = sorted((LabelEvent(i, lab, t) for i, lab, t in labels), key=lambda e: e.ts)
    i = j = 0
    last = None
    while i < len(recs):
        k = i + int(rng.integers(1, 40))
        batch = recs[i:k]
        now = batch[-1].ts
        runner.add_pairs(batch, now)
        while j < len(events) and (events[j].ts or 0.0) <= now:
            runner.add_labels([events[j]], now)
            j += 1
        ev = runner.tick(now)
        last = ev or last
        if last is not None and last.verdict in ("promote", "abort"):
            break
        i = k
    return last


def split_labels(recs, delay: float):
    """Strip inline labels; they arrive ``delay`` seconds after their pair instead."""
    bare = [dataclasses.replace(r, label=None) for r in recs]
    labels = [(r.id, r.label, r.ts + delay) for r in recs]
    return bare, labels


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (Scenario.slice_regression(drop=0.25, gain=0.02), "abort"),
        (Scenario.slice_regression(drop=-0.06, gain=0.06), "promote"),
    ],
)
def test_replay_and_online_reach_the_same_verdict(scenario, expected):
    recs, labels = split_labels(records(scenario, 6000, seed=21, t0=1000.0), delay=3.0)
    result = replay(recs, labels, gates=GATES, plan=PLAN)
    assert result.evaluation.verdict == expected
    live = online(recs, labels, seed=5)
    assert live is not None and live.verdict == expected
    # evaluations fall due at the same cadence: the decision points agree within one step
    assert result.evaluation.decided_at is not None and live.decided_at is not None
    assert abs(live.decided_at["pairs"] - result.evaluation.decided_at["pairs"]) <= 240
    if expected == "abort":
        assert "platform=android" in result.evaluation.reason


def test_labels_are_applied_at_their_time_or_with_their_pair():
    recs = records(Scenario.aa(), 1500, seed=22, t0=0.0)
    bare = [dataclasses.replace(r, label=None) for r in recs]
    late = [(r.id, r.label, r.ts + 600.0) for r in recs]  # all after the last pair
    res = replay(bare, late, gates=GATES, plan=PLAN, stop_at_decision=False)
    # the final evaluation is at the last label's time: all labels joined by then
    assert res.evaluation.labels == 1500 and res.unmatched_labels == 0
    # later than the pairs' window (1 day): the pairs left, the labels are reported
    too_late = [(r.id, r.label, r.ts + 2e5) for r in recs]
    res = replay(bare, too_late, gates=GATES, plan=PLAN, stop_at_decision=False)
    assert res.evaluation.labels == 0 and res.unmatched_labels == 1500
    untimed = [(r.id, r.label, None) for r in recs[:700]]
    res = replay(bare, untimed, gates=GATES, plan=PLAN, stop_at_decision=False)
    assert res.evaluation.labels == 700
    orphans = [("nope", 1, None), ("nada", 0, 5.0)]
    res = replay(bare, orphans, gates=GATES, plan=PLAN, stop_at_decision=False)
    assert res.unmatched_labels == 2
    assert {ev.id for ev, _ in res.unmatched_examples} == {"nope", "nada"}


def test_empty_input_is_refused():
    with pytest.raises(ValueError):
        replay([], gates=GATES, plan=PLAN)


def test_replay_reads_nothing_ahead_of_each_look():
    # Without configured keys, a slice key that only turns up late (region) must not change
    # any earlier look: every evaluation of the full replay equals the one a replay of the
    # records seen so far makes (what an online proxy knew at that moment).
    gates = GATES.model_copy(update={"slices": GATES.slices.model_copy(update={"keys": None})})
    recs = records(Scenario.slice_regression(drop=0.06, gain=0.01), 4000, seed=7)
    late = [
        dataclasses.replace(r, slices={**r.slices, "region": f"r{i % 7}"}) if i >= 2500 else r
        for i, r in enumerate(recs)
    ]
    full = replay(late, gates=gates, plan=PLAN, stop_at_decision=False)
    assert any("region=" in g.slice for g in full.evaluation.gates)
    for d in full.decisions:
        seen = [r for r in late if r.ts <= d.ts]
        prefix = replay(seen, gates=gates, plan=PLAN, stop_at_decision=False)
        mine = [x for x in prefix.decisions if x.ts <= d.ts]
        assert [(x.action, x.pairs, x.why) for x in mine] == [
            (x.action, x.pairs, x.why) for x in full.decisions if x.ts <= d.ts
        ]
