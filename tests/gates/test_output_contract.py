"""The contract gate's statistics: a broken contract fails within a few pairs, a rate of
violations under the limit almost never does (anytime, at every look), records without
descriptors are still judged by their shapes, and faults count as candidate errors."""

from __future__ import annotations

import numpy as np

from gates.batch import PairBatch
from gates.contract import ContractGate
from gates.engine import family_budgets
from gates.records import ModelResult, PairRecord
from gates.result import Status
from gates.settings import GatesSettings

SETTINGS = GatesSettings()
ALPHA = family_budgets(SETTINGS)["contract"]


def _record(i: int, broken: bool, *, described: bool = True) -> PairRecord:
    def side(width: int) -> ModelResult:
        out = np.full(width, 1.0 / width)
        if not described:
            return ModelResult(output=out, latency_ms=1.0)
        return ModelResult(out, 1.0, None, "probs", "FP32", (width,))

    return PairRecord(id=str(i), ts=float(i), champion=side(4), candidate=side(3 if broken else 4))


def _stream(rate: float, n: int, seed: int) -> list[PairRecord]:
    broken = np.random.default_rng(seed).random(n) < rate
    return [_record(i, bool(b)) for i, b in enumerate(broken)]


def test_every_pair_broken_fails_within_three_pairs() -> None:
    for described in (True, False):
        gate = ContractGate(SETTINGS, alpha=ALPHA)
        for i in range(50):
            gate.update([_record(i, True, described=described)])
            if gate.result.status is Status.FAIL:
                break
        assert gate.result.status is Status.FAIL and gate.n <= 3, (described, gate.n)
        assert "class count: candidate [3] vs champion [4] per row" in gate.result.reason


def test_false_fail_rate_under_the_limit_stays_within_alpha() -> None:
    """Violations at half the limit (0.5% < 1%), 200 streams of 1500 pairs, a look every
    50 pairs: FAILs anywhere in a stream are bounded by alpha (Ville), far below 2%."""
    fails = 0
    for seed in range(200):
        records = _stream(0.005, 1500, seed)
        gate = ContractGate(SETTINGS, alpha=ALPHA)
        for start in range(0, 1500, 50):
            gate.update(records[start : start + 50])
            if gate.result.status is Status.FAIL:
                fails += 1
                break
    assert fails / 200 <= 0.02


def test_a_rate_well_above_the_limit_fails() -> None:
    """10% of pairs broken (10x the limit): every one of 20 streams fails in 1500 pairs."""
    for seed in range(20):
        gate = ContractGate(SETTINGS, alpha=ALPHA)
        gate.update(_stream(0.10, 1500, seed))
        assert gate.result.status is Status.FAIL


def test_faults_are_candidate_errors_and_not_comparable() -> None:
    batch = PairBatch.from_records([_record(0, True), _record(1, False)])
    assert batch.contract_fault.tolist() == [True, False]
    assert batch.candidate_error.tolist() == [True, False]
    assert batch.comparable.tolist() == [False, True]


def test_champion_failures_do_not_judge_the_candidate() -> None:
    rec = _record(0, True)
    rec.champion = ModelResult(error="timeout: slow")
    gate = ContractGate(SETTINGS, alpha=ALPHA)
    gate.update([rec])
    assert gate.n == 0 and gate.k == 0
