"""The decision engine: stages, minimums, max duration, manual actions, state, output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gates.batch import PairBatch
from gates.engine import VERDICTS, InvalidTransition, RolloutEngine
from gates.settings import GatesSettings, RolloutSettings
from gates.simulate import Scenario, generate
from tests.gates.conftest import only, plan

STAGE = {"min_pairs": 0, "min_labels": 0, "min_duration_s": 0, "max_duration_s": None}
FAST = {"metric": {"min_samples": 50}, "slices": {"enabled": False}}


def traffic(sc: Scenario, n: int, seed: int, t0: float = 0.0) -> PairBatch:
    batch, _ = generate(sc, n, np.random.default_rng(seed), t0)
    return batch


def better() -> Scenario:
    return Scenario.slice_regression(drop=-0.05, gain=0.05)  # better everywhere


def worse() -> Scenario:
    return Scenario.slice_regression(drop=0.15, gain=-0.15)


def feed(eng: RolloutEngine, batch: PairBatch, labelled: bool = True) -> None:
    eng.observe(batch)
    if labelled:
        eng.observe_labelled(batch)


def two_stages(**kw) -> RolloutSettings:
    return plan(
        {"name": "shadow", **STAGE, **kw},
        {"name": "canary", "canary_weight": 0.2, **STAGE, **kw},
    )


def test_advances_then_promotes_with_recorded_evidence():
    eng = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    feed(eng, traffic(better(), 3000, 1))
    ev = eng.evaluate(10.0)
    assert ev.decision is not None and ev.decision.action == "advance"
    assert (ev.verdict, ev.stage, ev.canary_weight) == ("continue", "canary", 0.2)
    assert ev.decision.evidence and all(g["blocking"] or g["warning"] for g in ev.decision.evidence)
    assert "PASS" in ev.reason and "metric." in ev.reason  # names the tightest gate
    feed(eng, traffic(better(), 100, 2, t0=20.0))
    ev = eng.evaluate(20.0)
    assert ev.verdict == "promote" and ev.decided_at == {"pairs": 3100, "labels": 3100}
    assert eng.canary_weight == 1.0
    assert [d.action for d in eng.decisions] == ["advance", "promote"]
    # terminal: further evaluations keep the verdict and its reason
    assert eng.evaluate(30.0).verdict == "promote"
    with pytest.raises(InvalidTransition):
        eng.manual("abort", "ops", "too late", 31.0)


def test_aborts_as_soon_as_a_blocking_gate_fails_and_names_it():
    eng = RolloutEngine(only("metric", **FAST), two_stages(min_pairs=10**6), start_ts=0.0)
    feed(eng, traffic(worse(), 2000, 3))
    ev = eng.evaluate(5.0)
    assert ev.verdict == "abort" and ev.decision is not None and ev.decision.action == "abort"
    assert ev.canary_weight == 0.0
    assert "metric.accuracy FAIL" in ev.reason and "statistic" in ev.reason
    assert ev.decided_at == {"pairs": 2000, "labels": 2000}


def test_a_worse_slice_aborts_even_when_better_on_aggregate():
    settings = only("metric", metric={"min_samples": 50}, slices={"min_samples": 100})
    eng = RolloutEngine(settings, two_stages(min_pairs=10**6), start_ts=0.0)
    sc = Scenario.slice_regression(drop=0.2, gain=0.03)
    feed(eng, traffic(sc, 6000, 4))
    ev = eng.evaluate(5.0)
    agg = next(g for g in ev.gates if g.name == "metric.accuracy" and g.slice == "*")
    assert agg.statistic is not None and agg.statistic > 0  # better on aggregate ...
    assert ev.verdict == "abort" and "[platform=android]" in ev.reason  # ... caught anyway


def test_stage_minimums_block_advancing():
    eng = RolloutEngine(
        only("metric", **FAST),
        two_stages(min_pairs=5000, min_labels=4000, min_duration_s=60),
        start_ts=0.0,
    )
    feed(eng, traffic(better(), 3000, 5))
    ev = eng.evaluate(10.0)
    assert ev.verdict == "continue" and ev.decision is None
    assert "pairs 3000/5000" in ev.reason and "labels 3000/4000" in ev.reason
    assert "duration" in ev.reason
    feed(eng, traffic(better(), 2000, 6, t0=10.0))
    assert eng.evaluate(30.0).decision is None  # duration still short
    ev = eng.evaluate(61.0)
    assert ev.decision is not None and ev.decision.action == "advance"
    assert ev.stage_pairs == 0 and ev.stage_labels == 0  # counted from the stage start


@pytest.mark.parametrize("action", ["hold", "abort"])
def test_max_duration_holds_or_aborts_as_configured(action):
    p = two_stages(max_duration_s=100.0, on_max_duration=action)
    eng = RolloutEngine(only("metric", **FAST), p, start_ts=0.0)
    feed(eng, traffic(better(), 1000, 7), labelled=False)  # no labels: metric undecided
    assert eng.evaluate(50.0).verdict == "continue"
    ev = eng.evaluate(100.0)
    assert ev.verdict == action
    assert "maximum duration" in ev.reason and "metric: no labelled pairs yet" in ev.reason
    assert ev.decided_at == {"pairs": 1000, "labels": 0}
    if action == "hold":
        d = eng.manual("resume", "alice", "labels are delayed", 150.0)
        assert d.manual and d.who == "alice" and d.why == "labels are delayed"
        assert eng.evaluate(200.0).verdict == "continue"  # fresh clock from 150
        assert eng.evaluate(250.0).verdict == "hold"


def test_pause_stops_advancing_but_never_aborting():
    eng = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    eng.manual("pause", "bob", "freeze window", 1.0)
    with pytest.raises(InvalidTransition):
        eng.manual("pause", "bob", "again", 1.5)
    feed(eng, traffic(better(), 3000, 8))
    ev = eng.evaluate(2.0)
    assert ev.verdict == "hold" and ev.decision is None and "paused by bob" in ev.reason
    eng.manual("resume", "bob", "window over", 3.0)
    assert eng.evaluate(4.0).decision is not None  # advances now

    eng2 = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    eng2.manual("pause", "bob", "freeze window", 1.0)
    feed(eng2, traffic(worse(), 2000, 9))
    assert eng2.evaluate(2.0).verdict == "abort"


def test_manual_promote_and_abort_are_recorded_with_who_and_why():
    eng = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    d = eng.manual("promote", "carol", "hotfix, verified offline", 5.0)
    assert d.manual and d.verdict == "promote" and d.who == "carol"
    ev = eng.evaluate(6.0)
    assert ev.verdict == "promote" and "carol" in ev.reason and "hotfix" in ev.reason
    eng2 = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    eng2.manual("abort", "dave", "pager noise", 5.0)
    assert eng2.evaluate(6.0).verdict == "abort"
    with pytest.raises(InvalidTransition):
        eng2.manual("resume", "dave", "oops", 7.0)
    eng3 = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    with pytest.raises(InvalidTransition):
        eng3.manual("resume", "erin", "nothing to resume", 1.0)
    with pytest.raises(InvalidTransition):
        eng3.manual("promote", "  ", "no name", 1.0)


def test_stage_require_limits_the_gates_that_must_pass():
    p = plan(
        {"name": "shadow", **STAGE, "require": ["errors"]},
        {"name": "canary", **STAGE},
    )
    eng = RolloutEngine(only("metric", "errors", **FAST), p, start_ts=0.0)
    feed(eng, traffic(better(), 1000, 10), labelled=False)  # metric undecided
    ev = eng.evaluate(1.0)
    assert ev.decision is not None and ev.decision.to_stage == "canary"
    assert eng.evaluate(2.0).verdict == "continue"  # canary requires metric too


def test_only_slices_above_the_required_share_must_pass_to_advance():
    # android carries 10% of the traffic: below require_share 0.2 it may FAIL but need not
    # PASS; web (60%) and ios (30%) must PASS, so a floor they cannot reach holds the stage
    settings = only("metric", metric={"min_samples": 50}, slices={"require_share": 0.2})
    eng = RolloutEngine(settings, two_stages(), start_ts=0.0)
    feed(eng, traffic(better(), 3000, 11))
    ev = eng.evaluate(1.0)
    cells = {g.slice: g for g in ev.gates if g.name == "metric.accuracy" and g.slice != "*"}
    assert cells["platform=android"].exempt and not cells["platform=web"].exempt
    assert not cells["platform=ios"].exempt
    assert ev.decision is not None and ev.decision.action == "advance"
    held = only("metric", metric={"min_samples": 50}, slices={"min_samples": 10**6})
    eng = RolloutEngine(held, two_stages(), start_ts=0.0)
    feed(eng, traffic(better(), 3000, 11))
    ev = eng.evaluate(1.0)
    assert ev.decision is None and "platform=" in ev.reason  # waiting for a required slice


def test_a_slice_fails_below_its_minimum_sample_size():
    # no floor on FAIL: the betting e-process is valid from the first pair
    settings = only("metric", metric={"min_samples": 50}, slices={"min_samples": 10**6})
    eng = RolloutEngine(settings, two_stages(min_pairs=10**6), start_ts=0.0)
    feed(eng, traffic(Scenario.slice_regression(drop=0.3, gain=0.02), 6000, 4))
    ev = eng.evaluate(5.0)
    assert ev.verdict == "abort" and "metric.accuracy[platform=android] FAIL" in ev.reason


def test_cadence_every_k_pairs_or_t_seconds():
    p = plan({"name": "s", **STAGE}, every=100, every_s=10.0)
    eng = RolloutEngine(only("metric", **FAST), p, start_ts=0.0)
    assert not eng.due(5.0)
    feed(eng, traffic(better(), 99, 12))
    assert not eng.due(5.0)
    feed(eng, traffic(better(), 1, 13))
    assert eng.due(5.0)
    eng.evaluate(5.0)
    assert not eng.due(14.9) and eng.due(15.0)


def test_state_round_trip_continues_identically():
    eng = RolloutEngine(only("metric", "errors", **FAST), two_stages(min_pairs=10**6), start_ts=0)
    feed(eng, traffic(better(), 1500, 14))
    eng.manual("pause", "ops", "look", 2.0)
    eng.evaluate(3.0)
    blob = json.dumps(eng.state_dict(), allow_nan=False)
    back = RolloutEngine.from_state(json.loads(blob), eng.settings, eng.plan)
    more = traffic(better(), 700, 15, t0=5.0)
    for e in (eng, back):
        feed(e, more)
    a, b = eng.evaluate(9.0), back.evaluate(9.0)
    assert a.to_dict() == b.to_dict()
    assert [d.to_dict() for d in eng.decisions] == [d.to_dict() for d in back.decisions]


def test_merge_adds_evidence_and_refuses_other_stages():
    a = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    b = RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0)
    feed(a, traffic(better(), 500, 16))
    feed(b, traffic(better(), 700, 17))
    a.merge(b)
    assert (a.pairs, a.labels) == (1200, 1200)
    assert a.evaluate(1.0).decision is not None  # advanced
    with pytest.raises(ValueError):
        a.merge(RolloutEngine(only("metric", **FAST), two_stages(), start_ts=0.0))


def test_evaluation_dict_verdict_dict_and_metric_samples():
    eng = RolloutEngine(GatesSettings(), RolloutSettings(), start_ts=0.0)
    feed(eng, traffic(Scenario.aa(), 1200, 18))
    ev = eng.evaluate(30.0)
    d = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    for key in ("verdict", "decided_at", "reason", "stage", "canary_weight", "gates"):
        assert key in d
    for g in d["gates"]:
        assert {"name", "slice", "status", "statistic", "threshold", "n", "method"} <= set(g)
    v = ev.verdict_dict()
    assert v["verdict"] in VERDICTS and v["stage"] == "shadow" and "reason" in v
    names = {name for name, _, _ in ev.metric_samples()}
    assert names == {
        "mirrorgate_gate_status",
        "mirrorgate_gate_statistic",
        "mirrorgate_gate_threshold",
        "mirrorgate_rollout_verdict",
        "mirrorgate_rollout_stage",
        "mirrorgate_rollout_canary_weight",
    }
    verdicts = [(lab["verdict"], v) for n, lab, v in ev.metric_samples() if n.endswith("verdict")]
    assert sum(v for _, v in verdicts) == 1.0
    statuses = [v for n, _, v in ev.metric_samples() if n == "mirrorgate_gate_status"]
    assert set(statuses) <= {0.0, 1.0, 2.0}


def test_reference_is_set_only_by_a_recorded_act():
    eng = RolloutEngine(only("drift.input"), RolloutSettings(), start_ts=0.0)
    from tests.gates.conftest import record

    refs = [record(i, [1.0], [1.0], features={"x": float(i % 10)}) for i in range(200)]
    d = eng.set_reference(refs, now=0.0, who="ops", why="last week's traffic")
    assert d.action == "reference" and d.who == "ops" and eng.decisions == [d]
    eng.observe([record(i, [1.0], [1.0], features={"x": 3.0}) for i in range(50)])
    with pytest.raises(ValueError):
        eng.set_reference(refs, now=1.0, who="ops", why="again")


def test_cells_state_their_level_blocking_from_alpha_advisory_their_own():
    # retrained: tolerance, output drift and the hc error rate are advisory; the blocking
    # cells' levels sum within alpha, the advisory ones carry their own stated level
    from gates.engine import advisory_level, family_budgets
    from tests.gates.conftest import classification_records

    g = GatesSettings()
    eng = RolloutEngine(g, RolloutSettings(), start_ts=0.0)
    recs = classification_records(600, 4)
    eng.observe(recs)
    eng.observe_labelled(recs)
    cells = {(r.name, r.slice): r for r in eng.evaluate(1.0).gates}
    metric = family_budgets(g)["metric"]
    acc = cells[("metric.accuracy", "*")]
    assert acc.blocking and acc.details["alpha"] == pytest.approx(metric / 2 / 2)
    hc = cells[("metric.high_confidence_error", "*")]
    assert not hc.blocking and hc.details["alpha"] == pytest.approx(metric / 3 / 2)
    shift = cells[("tolerance.shift", "*")]
    assert not shift.blocking
    assert shift.details["alpha"] < advisory_level(g, "tolerance")
    blocking = sum(r.details.get("alpha", 0.0) for r in cells.values() if r.blocking)
    assert 0 < blocking <= g.alpha


def test_metric_check_weights_move_budget_between_checks_within_the_family():
    # metric.<check>.alpha_weight splits the family's budget by weight (equal by default):
    # accuracy 2 : recall 1 gives accuracy two thirds of it, and the blocking cells still
    # sum within alpha; the advisory hc error rate keeps its weighted share as its level
    from gates.engine import family_budgets
    from tests.gates.conftest import classification_records

    g = GatesSettings.model_validate({"metric": {"accuracy": {"alpha_weight": 2.0}}})
    eng = RolloutEngine(g, RolloutSettings(), start_ts=0.0)
    recs = classification_records(600, 4)
    eng.observe(recs)
    eng.observe_labelled(recs)
    cells = {(r.name, r.slice): r for r in eng.evaluate(1.0).gates}
    metric = family_budgets(g)["metric"]
    acc = cells[("metric.accuracy", "*")]
    assert acc.details["alpha"] == pytest.approx(metric * 2 / 3 / 2)  # half to the slices
    recall = [r for (name, _), r in cells.items() if name.startswith("metric.recall")]
    assert recall and sum(r.details["alpha"] for r in recall) <= metric / 3 * (1 + 1e-9)
    hc = cells[("metric.high_confidence_error", "*")]
    assert not hc.blocking and hc.details["alpha"] == pytest.approx(metric / 4 / 2)
    blocking = sum(r.details.get("alpha", 0.0) for r in cells.values() if r.blocking)
    assert 0 < blocking <= g.alpha
    with pytest.raises(ValueError):
        GatesSettings.model_validate({"metric": {"recall": {"alpha_weight": 0}}})
