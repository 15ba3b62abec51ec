"""Each gate fires on the failure it exists for, and passes when there is none."""

from __future__ import annotations

import json

import numpy as np

from gates.batch import PairBatch
from gates.engine import RolloutEngine
from gates.latency import ErrorGate, LatencyGate
from gates.pinned import PinnedGate
from gates.result import Status
from gates.simulate import Scenario, generate
from gates.tolerance import ToleranceGate
from tests.gates.conftest import only, plan, record

RNG = np.random.default_rng(51)
STAGE = {"min_pairs": 0, "min_labels": 0, "min_duration_s": 0, "max_duration_s": None}


def statuses(gate) -> dict[str, Status]:
    return {r.label: r.status for r in gate.results}


def probs(n: int, c: int = 3, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    p = RNG.dirichlet(np.ones(c), n)
    q = np.clip(p + RNG.normal(0, noise, p.shape), 0, None) if noise else p.copy()
    return p, q / q.sum(axis=1, keepdims=True)


def test_tolerance_flags_flips_and_passes_identical_outputs():
    p, q = probs(3000)
    same = ToleranceGate(only("tolerance"), alpha=0.01)
    same.update(PairBatch.from_arrays(champion=p, candidate=q, ts=np.arange(3000.0)))
    assert set(statuses(same).values()) == {Status.PASS}
    flipped = q.copy()
    idx = RNG.random(3000) < 0.3
    flipped[idx] = q[idx][:, ::-1]  # reverse the class order on 30% of the rows
    bad = ToleranceGate(only("tolerance"), alpha=0.01)
    bad.update(PairBatch.from_arrays(champion=p, candidate=flipped, ts=np.arange(3000.0)))
    assert statuses(bad)["tolerance.flip"] is Status.FAIL
    assert bad.result.status is Status.FAIL and bad.result.details["failing"] == 2  # shift too


def test_tolerance_for_regression_and_embeddings():
    y = RNG.normal(10, 2, 2000)
    reg = ToleranceGate(only("tolerance"), alpha=0.01, task="regression")
    reg.update(PairBatch.from_arrays(champion=y, candidate=y * 1.5, ts=np.arange(2000.0)))
    assert statuses(reg)["tolerance.regression"] is Status.FAIL
    e = RNG.normal(size=(2000, 16))
    emb = ToleranceGate(only("tolerance"), alpha=0.01, task="embedding")
    emb.update(PairBatch.from_arrays(champion=e, candidate=e + 0.01, ts=np.arange(2000.0)))
    assert statuses(emb) == {"tolerance.cosine": Status.PASS}
    rot = ToleranceGate(only("tolerance"), alpha=0.01, task="embedding")
    rot.update(PairBatch.from_arrays(champion=e, candidate=-e, ts=np.arange(2000.0)))
    assert statuses(rot) == {"tolerance.cosine": Status.FAIL}


def test_latency_fails_a_slower_candidate_and_passes_an_equal_one():
    lc = RNG.lognormal(2.5, 0.3, 3000)
    recs = [record(i, [1.0], [1.0], lat=(float(lc[i]), float(lc[i]) * 3)) for i in range(3000)]
    slow = LatencyGate(only("latency"), alpha=0.01)
    slow.update(recs)
    assert set(statuses(slow).values()) == {Status.FAIL}
    same = LatencyGate(only("latency"), alpha=0.01)
    same.update([record(i, [1.0], [1.0], lat=(float(v), float(v))) for i, v in enumerate(lc)])
    assert set(statuses(same).values()) == {Status.PASS}


def test_errors_fail_when_the_candidate_fails_more_often():
    recs = [
        record(i, [1.0], [1.0], err=(None, "upstream timeout" if i % 10 == 0 else None))
        for i in range(3000)
    ]
    gate = ErrorGate(only("errors"), alpha=0.01)
    gate.update(recs)
    s = statuses(gate)
    assert s["errors.error_rate"] is Status.FAIL and s["errors.timeout_rate"] is Status.FAIL
    not_called = [record(i, [1.0], [1.0], err=(None, "dropped")) for i in range(500)]
    gate2 = ErrorGate(only("errors"), alpha=0.01)
    gate2.update(not_called)  # never mirrored: not an observation, not an error
    assert gate2.results[0].n == 0


def test_errors_count_each_request_once_not_each_row():
    """A failed call marks every row of its batched request: one failure, not B. Two
    failed 8-row requests were sixteen "independent" failures to the error gate; as many
    failed single-row requests are sixteen and do fail. A request failed if any of its
    rows did (an output fault can be one row's), and it counts once even when its rows
    reach the gate in two batches."""
    import dataclasses

    def requests(count: int, rows: int, failed_row: int | None = None) -> list:
        out = []
        for q in range(count):
            for row in range(rows):
                failed = failed_row is None or row == failed_row
                err = (None, "backend_error: upstream answered 500") if failed else (None, None)
                r = record(q * rows + row, [0.25, 0.75], [0.25, 0.75], err=err)
                out.append(dataclasses.replace(r, id=f"q{q}#{row}" if rows > 1 else f"q{q}"))
        return out

    def error_rate(*batches: list):
        gate = ErrorGate(only("errors"), alpha=0.05)
        for batch in batches:
            gate.update(batch)
        return next(r for r in gate.results if r.name == "errors.error_rate")

    batched = error_rate(requests(2, 8))
    assert batched.n == 2 and batched.status is not Status.FAIL
    assert batched.details["candidate_rate"] == 1.0
    single = error_rate(requests(16, 1))
    assert single.n == 16 and single.status is Status.FAIL
    # one row's fault fails its request, once
    one_row = error_rate(requests(3, 8, failed_row=5))
    assert one_row.n == 3 and one_row.details["candidate_rate"] == 1.0
    # a request split over two gate batches counts once
    rows = requests(1, 8)
    assert error_rate(rows[:3], rows[3:]).n == 1


def test_pinned_fails_on_a_wrong_pinned_case():
    gate = PinnedGate(only("pinned"), alpha=0.0)
    gate.record("case-1", True, ts=1.0)
    assert gate.result.status is Status.PASS
    gate.record("case-2", False, ts=2.0, detail="predicted 3, pinned 1")
    assert gate.result.status is Status.FAIL and "case-2" in gate.result.reason


def test_output_divergence_aborts_but_input_drift_only_warns():
    p = plan({"name": "s", **STAGE, "min_pairs": 10**9})
    # candidate predicts class 0 far more often than the champion on the same requests
    _, cols = generate(Scenario.aa(), 4000, np.random.default_rng(52))
    cand = np.array(cols["candidate"])
    move = np.random.default_rng(53).random(4000) < 0.3
    cand[move] = np.array([0.9, 0.05, 0.05])
    eng = RolloutEngine(only("drift.output"), p, start_ts=0.0)
    eng.observe(PairBatch.from_arrays(champion=cols["champion"], candidate=cand, ts=cols["ts"]))
    ev = eng.evaluate(100.0)
    assert ev.verdict == "abort" and "drift.output FAIL" in ev.reason

    eng2 = RolloutEngine(only("drift.input"), p, start_ts=0.0)
    for shift, seed in ((0.0, 54), (15.0, 55)):  # reference first, then shifted ages
        b, _ = generate(Scenario.aa(age_shift=shift), 3000, np.random.default_rng(seed))
        eng2.observe(b)
    ev2 = eng2.evaluate(100.0)
    assert ev2.verdict == "continue"
    assert [w.name for w in ev2.warnings] == ["drift.input.age"]
    assert "warnings" in ev2.to_dict() and ev2.to_dict()["warnings"]
    json.dumps(ev2.to_dict(), allow_nan=False)


def _latency_records(n: int, factor: float, timeout_share: float, seed: int) -> list:
    rng = np.random.default_rng(seed)
    lc = rng.lognormal(1.5, 0.3, n)
    la = lc * factor * rng.lognormal(0.0, 0.1, n)
    slow = la >= np.quantile(la, 1.0 - timeout_share) if timeout_share else np.zeros(n, bool)
    return [
        record(
            i,
            [1.0],
            [1.0],
            lat=(float(lc[i]), float("nan") if slow[i] else float(la[i])),
            err=(None, "upstream timed out" if slow[i] else None),
        )
        for i in range(n)
    ]


def test_timed_out_candidate_calls_are_censored_at_the_timeout_not_dropped():
    # 1.2x the champion on answered requests (within 1.5x), but its slowest 10% time out:
    # dropped from both sides the candidate would look fine; counted at the timeout its p95
    # is the timeout
    settings = only("latency", latency={"timeout_ms": 100.0, "min_samples": 100})
    gate = LatencyGate(settings, alpha=0.05)
    gate.update(_latency_records(3000, 1.2, 0.10, seed=1))
    st = statuses(gate)
    assert st["latency.p95"] is Status.FAIL and st["latency.p99"] is Status.FAIL
    p95 = next(r for r in gate.results if r.name == "latency.p95")
    assert p95.details["candidate_ms"] > 90  # the censored value, not the answered ones
    fine = LatencyGate(settings, alpha=0.05)
    fine.update(_latency_records(3000, 1.2, 0.0, seed=1))
    assert statuses(fine)["latency.p95"] is Status.PASS


def test_paired_latency_check_on_per_request_ratios():
    settings = only("latency", latency={"min_samples": 100, "slack_ms": 0.0})
    slow = LatencyGate(settings, alpha=0.05)
    slow.update(_latency_records(400, 2.0, 0.0, seed=2))  # 2x on every request
    assert statuses(slow)["latency.paired"] is Status.FAIL
    same = LatencyGate(settings, alpha=0.05)
    same.update(_latency_records(400, 1.0, 0.0, seed=3))
    res = next(r for r in same.results if r.name == "latency.paired")
    assert res.status is Status.PASS and res.statistic < 0.1


def test_latency_counts_each_request_once_not_each_row():
    """The B rows of a batched request (ids ``<request>#<row>``) share its two calls'
    latencies: one observation. Two slow 8-row requests were "16 of 16" and failed
    ``latency.paired`` (the Argo abort-then-promote run under the shadow worker); as
    many slow single-row requests are 16 observations and do fail."""
    import dataclasses

    settings = only("latency", latency={"slack_ms": 0.0})

    def requests(count: int, rows: int) -> list:
        out = []
        for q in range(count):
            for row in range(rows):
                r = record(q * rows + row, [0.25, 0.75], [0.25, 0.75], lat=(1.0, 10.0))
                rid = f"q{q}#{row}" if rows > 1 else f"q{q}"
                out.append(dataclasses.replace(r, id=rid))
        return out

    def paired(records: list):
        gate = LatencyGate(settings, alpha=0.05)
        gate.update(records)
        return next(r for r in gate.results if r.name == "latency.paired")

    batched = paired(requests(2, 8))
    assert batched.n == 2 and batched.status is not Status.FAIL
    single = paired(requests(16, 1))
    assert single.n == 16 and single.status is Status.FAIL
    # a request whose rows arrive in two batches still counts once
    gate = LatencyGate(settings, alpha=0.05)
    rows = requests(1, 8)
    gate.update(rows[:3])
    gate.update(rows[3:])
    assert next(r for r in gate.results if r.name == "latency.paired").n == 1
