"""Each gate's statistic against a reference implementation on fixed data.

scipy's two-sample KS and chi-square, a textbook PSI, McNemar's exact test (binomtest on
the discordant pairs), scikit-learn's macro F1, a textbook ECE and numpy's quantiles.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, chi2_contingency, ks_2samp
from sklearn.metrics import f1_score

from gates.batch import PairBatch
from gates.drift import InputDriftGate, OutputDriftGate
from gates.latency import LatencyGate
from gates.metric import MetricGate
from gates.stats import log_threshold, psi, ternary_log_e
from tests.gates.conftest import only, record

ALPHA = 0.05


def _probs(pred: np.ndarray, top: np.ndarray, c: int) -> np.ndarray:
    p = np.repeat(((1 - top) / (c - 1))[:, None], c, axis=1)
    p[np.arange(len(pred)), pred] = top
    return p


def _paired(n: int, seed: int, c: int = 3) -> tuple[PairBatch, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    pred_c = np.where(rng.random(n) < 0.85, y, rng.integers(0, c, n))
    pred_a = np.where(rng.random(n) < 0.8, y, rng.integers(0, c, n))
    top_c, top_a = rng.uniform(0.4, 1.0, n), rng.uniform(0.4, 1.0, n)
    batch = PairBatch.from_arrays(
        champion=_probs(pred_c, top_c, c),
        candidate=_probs(pred_a, top_a, c),
        ts=np.arange(n, dtype=float),
        labels=y,
    )
    return batch, {"y": y, "pc": pred_c, "pa": pred_a, "tc": top_c, "ta": top_a}


def test_accuracy_cell_is_the_mcnemar_table_and_never_bolder_than_the_exact_test():
    batch, d = _paired(3000, 1)
    gate = MetricGate(only("metric", metric={"accuracy": {"margin": 0.0}}), alpha=ALPHA)
    gate.update(batch)
    n, s1, s2 = gate.tables["accuracy"].row("*")
    ok_c, ok_a = d["pc"] == d["y"], d["pa"] == d["y"]
    b = int((ok_c & ~ok_a).sum())  # champion right, candidate wrong
    c = int((~ok_c & ok_a).sum())
    assert (n, s1, s2) == (3000, c - b, b + c)
    res = next(r for r in gate.results if r.name == "metric.accuracy" and r.slice == "*")
    assert res.statistic == pytest.approx((c - b) / 3000)
    # random tables: whenever the anytime test FAILs at alpha, McNemar's exact one-sided
    # test rejects at alpha on the same (fixed-sample) data; when McNemar is overwhelming,
    # the anytime test rejects too.
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(50, 5000))
        disc = rng.binomial(n, rng.uniform(0.01, 0.3))
        c = int(rng.binomial(disc, rng.uniform(0.2, 0.8)))
        b = disc - c
        fail = ternary_log_e(n, c - b, b + c, 0.0, "less") >= log_threshold(ALPHA)
        p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
        if fail:
            assert p <= ALPHA
        if p < 1e-6:
            assert fail


def test_input_drift_ks_matches_scipy_on_discrete_data():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 8, 2000)
    cur = np.clip(rng.integers(0, 8, 3000) + rng.integers(0, 2, 3000), 0, 7)
    gate = InputDriftGate(only("drift.input"), alpha=ALPHA)
    gate.set_reference(
        [record(i, [0.5, 0.5], [0.5, 0.5], features={"x": int(v)}) for i, v in enumerate(ref)]
    )
    gate.update(
        [record(i, [0.5, 0.5], [0.5, 0.5], features={"x": int(v)}) for i, v in enumerate(cur)]
    )
    (res,) = gate.results
    assert res.details["ks"] == pytest.approx(ks_2samp(ref, cur).statistic, abs=1e-12)
    # the shift (KS ~0.06, PSI ~0.08) is real but inside the limit 0.1: it is never
    # flagged, however large the sample (significance is tested at the limit, not at 0)
    assert not res.details["significant"] and res.details["ks"] < 0.1 and res.statistic < 0.2
    assert res.status.value != "FAIL" and not res.blocking


def test_input_drift_chi_square_matches_scipy():
    rng = np.random.default_rng(4)
    cats = np.array(["a", "b", "c", "d"])
    ref = cats[rng.choice(4, 1500, p=[0.4, 0.3, 0.2, 0.1])]
    cur = cats[rng.choice(4, 2500, p=[0.3, 0.3, 0.25, 0.15])]
    gate = InputDriftGate(only("drift.input"), alpha=ALPHA)
    gate.set_reference([record(i, [1.0], [1.0], features={"c": str(v)}) for i, v in enumerate(ref)])
    gate.update([record(i, [1.0], [1.0], features={"c": str(v)}) for i, v in enumerate(cur)])
    (res,) = gate.results
    table = [[int((ref == k).sum()) for k in cats], [int((cur == k).sum()) for k in cats]]
    stat, p, dof, _ = chi2_contingency(table, correction=False)
    assert res.details["chi2"] == pytest.approx(stat)
    assert res.details["chi2_dof"] == dof
    assert res.details["p_fixed_sample"] == pytest.approx(p)


def test_input_drift_psi_matches_a_textbook_psi():
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 1, 5000)
    cur = rng.normal(0.4, 1.2, 4000)
    gate = InputDriftGate(only("drift.input"), alpha=ALPHA)
    gate.set_reference(
        [record(i, [1.0], [1.0], features={"x": float(v)}) for i, v in enumerate(ref)]
    )
    gate.update([record(i, [1.0], [1.0], features={"x": float(v)}) for i, v in enumerate(cur)])
    (res,) = gate.results
    # textbook: deciles of the reference, proportions per bin, empty bins floored
    cuts = np.quantile(ref, np.arange(1, 10) / 10)
    e = np.histogram(ref, bins=np.concatenate([[-np.inf], cuts, [np.inf]]))[0] / len(ref)
    a = np.histogram(cur, bins=np.concatenate([[-np.inf], cuts, [np.inf]]))[0] / len(cur)
    e, a = np.maximum(e, 1e-4), np.maximum(a, 1e-4)
    textbook = float(np.sum((a - e) * np.log(a / e)))
    assert res.statistic == pytest.approx(textbook, rel=1e-9)
    assert res.statistic > 0.1  # PSI is evidence; the flag needs the test at the limit
    far = InputDriftGate(only("drift.input"), alpha=ALPHA)
    far.set_reference(
        [record(i, [1.0], [1.0], features={"x": float(v)}) for i, v in enumerate(ref)]
    )
    far.update([record(i, [1.0], [1.0], features={"x": float(v) + 0.6}) for i, v in enumerate(cur)])
    (res,) = far.results
    assert res.details["ks"] > 0.25
    assert res.status.value == "FAIL" and res.warning and res.details["significant"]
    assert psi([10, 0], [5, 5]) == pytest.approx(
        (0.5 - 1) * np.log(0.5 / 1) + (0.5 - 1e-4) * np.log(0.5 / 1e-4)
    )


def test_output_drift_chi_square_matches_scipy_on_predicted_classes():
    batch, d = _paired(4000, 6)
    gate = OutputDriftGate(only("drift.output"), alpha=ALPHA)
    gate.update(batch)
    (res,) = gate.results
    table = [np.bincount(d["pc"], minlength=3), np.bincount(d["pa"], minlength=3)]
    assert res.details["chi2"] == pytest.approx(chi2_contingency(table, correction=False)[0])
    diff = np.abs(table[1] - table[0]) / 4000
    assert res.statistic == pytest.approx(diff.max())


def test_evidence_metrics_match_sklearn_and_a_textbook_ece():
    batch, d = _paired(3000, 7)
    gate = MetricGate(only("metric", metric={"min_samples": 10}), alpha=ALPHA)
    gate.update(batch)
    res = {r.name: r for r in gate.results}
    f1_c = f1_score(d["y"], d["pc"], average="macro")
    f1_a = f1_score(d["y"], d["pa"], average="macro")
    assert res["metric.macro_f1"].details["champion"] == pytest.approx(f1_c)
    assert res["metric.macro_f1"].statistic == pytest.approx(f1_a - f1_c)

    def ece(top: np.ndarray, ok: np.ndarray, bins: int = 15) -> float:
        total = 0.0
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            sel = (top >= lo) & (top < hi) if b < bins - 1 else (top >= lo)
            if sel.any():
                total += sel.sum() / len(top) * abs(ok[sel].mean() - top[sel].mean())
        return total

    e_c = ece(d["tc"], d["pc"] == d["y"])
    e_a = ece(d["ta"], d["pa"] == d["y"])
    assert res["metric.ece"].details["champion"] == pytest.approx(e_c)
    assert res["metric.ece"].statistic == pytest.approx(e_a - e_c)
    for name in ("metric.macro_f1", "metric.precision", "metric.ece"):
        assert not res[name].blocking


def test_latency_point_quantiles_within_one_bucket_of_numpy():
    rng = np.random.default_rng(8)
    lc, la = rng.lognormal(1.5, 0.4, 5000), rng.lognormal(1.7, 0.4, 5000)
    gate = LatencyGate(only("latency"), alpha=ALPHA)
    gate.update([record(i, [1.0], [1.0], lat=(float(lc[i]), float(la[i]))) for i in range(5000)])
    quantile_results = [r for r in gate.results if r.name != "latency.paired"]
    assert [r.name for r in quantile_results] == ["latency.p95", "latency.p99"]
    for r in quantile_results:
        q = 0.95 if r.name.endswith("p95") else 0.99
        assert r.details["champion_ms"] == pytest.approx(np.quantile(lc, q), rel=0.05)
        assert r.details["candidate_ms"] == pytest.approx(np.quantile(la, q), rel=0.05)
