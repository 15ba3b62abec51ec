"""Latency and error gates: the candidate against the champion on the same requests.

Latency, censoring: a failed or timed-out call is not dropped (that would make a candidate
whose slow requests time out look faster); it counts as slow: at ``latency.timeout_ms``
when configured (or its recorded latency if larger), else at its recorded latency, else
beyond every bucket. Both models are treated alike.

Latency, paired (``latency.paired``): per request, ``b = 1[cand > max_ratio * champ +
slack]``; the Bernoulli mixture e-process tests ``P(b = 1) <= paired_max_share`` (0.5: a
sign test that the median per-request ratio is within the limit). Pairs are the unit, so
the test sees the request-level difference that two marginal histograms cannot. A
request is one observation, for the quantiles too: the B rows of a batched request share
its two calls' latencies, and counting them B times would take B identical draws for B
independent ones (8 rows: two slow requests were "16 of 16" and aborted a candidate).

Latency, quantiles: each model's latencies go into the same fixed log-spaced histogram (4%
wide buckets from 1 us to 1000 s; mergeable by addition, bounded memory, quantiles to
within one bucket). For a fixed quantile q only one point of the CDF matters, so a single
Bernoulli confidence sequence per bound is valid at every look (Howard & Ramdas 2022):
``q_cand > L_cand`` and ``q_champ <= U_champ`` each hold with probability
``>= 1 - alpha/2`` uniformly over time. FAIL when ``L_cand > ratio * U_champ + slack``
(the candidate's quantile is confidently above the limit), PASS when
``U_cand <= ratio * L_champ + slack``.

Errors: per request ``d = cand_failed - champ_failed`` in {-1, 0, 1} (likewise for
timeouts); FAIL when the mean (the excess failure rate) is confidently above
``max_excess``, PASS when confidently below; betting e-process on the counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gates.base import Gate, decide, status_of
from gates.batch import FloatArray, PairBatch
from gates.result import AGGREGATE, GateResult, Method, Status, fmt
from gates.sliced import phrase
from gates.stats import quantile_bounds

LAT_MIN_MS = 1e-3
LAT_RATIO = 1.04
LAT_BUCKETS = int(np.ceil(np.log(1e6 / LAT_MIN_MS) / np.log(LAT_RATIO))) + 1
# upper edges of buckets: (0, min], (min, min*r], ..., and a last (.., inf) bucket
LAT_EDGES: FloatArray = np.append(LAT_MIN_MS * LAT_RATIO ** np.arange(LAT_BUCKETS), np.inf)

LATENCY_METHOD = Method(
    "quantile confidence sequences",
    "fixed log-bucket histograms; one Bernoulli betting CS per quantile bound and model "
    "(Howard & Ramdas 2022), Ville's inequality: valid at every look",
)
ERROR_METHOD = Method(
    "paired betting e-process",
    "per-request difference of failure indicators in {-1,0,1}; betting mixture, valid at "
    "every look",
)


PAIRED_METHOD = Method(
    "paired sign test, beta-binomial mixture e-process",
    "per request: candidate latency > max_ratio x champion + slack (failed calls censored "
    "at the timeout); anytime-valid bound on the share of such requests",
)


def latency_bucket(ms: FloatArray) -> np.ndarray:
    x = np.minimum(np.maximum(ms, LAT_MIN_MS), 1e300)  # inf: the last (.., inf) bucket
    idx = np.ceil(np.log(x / LAT_MIN_MS) / np.log(LAT_RATIO) - 1e-9).astype(np.int64)
    return np.clip(idx, 0, len(LAT_EDGES) - 1)


def _point_quantile(counts: FloatArray, q: float) -> float:
    n = counts.sum()
    if n <= 0:
        return float("nan")
    j = int(np.searchsorted(np.cumsum(counts), q * n, side="left"))
    j = min(j, len(LAT_EDGES) - 1)
    hi = LAT_EDGES[j] if np.isfinite(LAT_EDGES[j]) else LAT_EDGES[j - 1]
    lo = LAT_EDGES[j - 1] if j > 0 else 0.0
    return float(np.sqrt(max(lo, 1e-12) * hi)) if j > 0 else float(hi)


class LatencyGate(Gate):
    family = "latency"

    @property
    def enabled(self) -> bool:
        return self.settings.latency.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.latency.blocking

    waiting_for = "no pairs with both latencies yet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hist = {
            "champion": np.zeros(len(LAT_EDGES)),
            "candidate": np.zeros(len(LAT_EDGES)),
        }
        self.paired = np.zeros(2)  # pairs, pairs where the candidate exceeded the limit

    def _censored(self, ms: FloatArray, failed: np.ndarray) -> FloatArray:
        """Latencies with failed calls counted as slow (censored at the timeout)."""
        timeout = self.settings.latency.timeout_ms
        if timeout is not None:
            late = np.maximum(np.nan_to_num(ms, nan=0.0), timeout)
        else:
            late = np.where(np.isfinite(ms) & (ms >= 0), ms, np.inf)
        return np.where(failed, late, ms)

    def _update(self, batch: PairBatch) -> None:
        lc = self._censored(batch.champion_latency, batch.champion_error)
        la = self._censored(batch.candidate_latency, batch.candidate_error)
        ok_c = ~np.isnan(lc) & (lc >= 0)
        ok_a = ~np.isnan(la) & (la >= 0)
        mask = batch.observed & ok_c & ok_a
        if batch.first_row is not None:
            # one observation per call: the rows of a batched request share its latency
            mask &= batch.first_row
        if not mask.any():
            return
        size = len(LAT_EDGES)
        self.hist["champion"] += np.bincount(latency_bucket(lc[mask]), minlength=size)
        self.hist["candidate"] += np.bincount(latency_bucket(la[mask]), minlength=size)
        cfg = self.settings.latency
        with np.errstate(invalid="ignore"):
            slower = la[mask] > cfg.max_ratio * lc[mask] + cfg.slack_ms
        self.paired += np.array([float(mask.sum()), float(slower.sum())])

    def _compute(self) -> list[GateResult]:
        cfg = self.settings.latency
        if not cfg.enabled:
            return []
        n = int(self.hist["champion"].sum())
        if n == 0:
            return []
        out: list[GateResult] = []
        a_q = self.alpha / (len(cfg.quantiles) + int(cfg.paired))
        if cfg.paired:
            out.append(self._paired_result(a_q))
        qs = np.array(cfg.quantiles * 2)
        nq = len(cfg.quantiles)
        alphas = np.array([a_q] * nq + [self.settings.alpha_pass] * nq)
        both = np.stack([self.hist["champion"], self.hist["candidate"]])
        lows, ups = quantile_bounds(both, LAT_EDGES, qs, alphas)  # one call, both models
        lo_c_all, up_c_all, lo_a_all, up_a_all = lows[0], ups[0], lows[1], ups[1]
        for i, q in enumerate(cfg.quantiles):
            # FAIL side at the family budget, PASS side at alpha_pass
            up_c, lo_a = float(up_c_all[i]), float(lo_a_all[i])
            lo_cp, up_ap = float(lo_c_all[nq + i]), float(up_a_all[nq + i])
            fail = lo_a > cfg.max_ratio * up_c + cfg.slack_ms
            passed = up_ap <= cfg.max_ratio * lo_cp + cfg.slack_ms
            enough = n >= cfg.min_samples
            # the quantile CSs are valid from the first pair: only a PASS waits for the floor
            status = status_of(fail, passed and enough, True)
            pc = _point_quantile(self.hist["champion"], q)
            pa = _point_quantile(self.hist["candidate"], q)
            ratio = pa / pc if pc > 0 else float("nan")
            word = (
                f"INCONCLUSIVE (n={n} < {cfg.min_samples} to PASS)"
                if status is Status.INCONCLUSIVE and not enough
                else status.value
            )
            name = f"p{round(q * 100, 3):g}"
            reason = (
                f"{word}: candidate {name} latency {fmt(pa)} ms vs champion {fmt(pc)} ms "
                f"(ratio {fmt(ratio)}, limit {fmt(cfg.max_ratio)} x champion + "
                f"{fmt(cfg.slack_ms)} ms; anytime bounds candidate ({fmt(lo_a)}, {fmt(up_ap)}],"
                f" champion ({fmt(lo_cp)}, {fmt(up_c)}], n={n})"
            )
            out.append(
                GateResult(
                    name=f"latency.{name}",
                    slice=AGGREGATE,
                    status=status,
                    statistic=ratio,
                    threshold=cfg.max_ratio,
                    n=n,
                    confidence=1.0 - (self.settings.alpha_pass if status is Status.PASS else a_q),
                    method=LATENCY_METHOD,
                    reason=reason,
                    blocking=cfg.blocking,
                    lower=lo_a,
                    upper=up_ap,
                    insufficient=not enough,
                    details={
                        "champion_ms": pc,
                        "candidate_ms": pa,
                        "champion_upper_ms": up_c,
                        "candidate_lower_ms": lo_a,
                        "alpha": a_q,
                    },
                )
            )
        return out

    def _paired_result(self, alpha: float) -> GateResult:
        cfg = self.settings.latency
        n, k = float(self.paired[0]), float(self.paired[1])
        d = decide(
            "rate", np.array([n]), np.array([k]), None, cfg.paired_max_share, alpha,
            self.settings.alpha_pass, "high",
        )  # fmt: skip
        failed, enough = bool(d.fail[0]), n >= cfg.min_samples
        passed = bool(d.passed[0]) and enough
        status = Status.FAIL if failed else Status.PASS if passed else Status.INCONCLUSIVE
        if status is Status.INCONCLUSIVE and not enough:
            word = f"INCONCLUSIVE (n={int(n)} < {cfg.min_samples} to PASS)"
        else:
            word = status.value
        share = k / n if n > 0 else float("nan")
        reason = (
            f"{word}: share of requests where the candidate took more than "
            f"{fmt(cfg.max_ratio)} x the champion's latency + {fmt(cfg.slack_ms)} ms (failed "
            f"calls counted at the timeout) is {fmt(share)} (n={int(n)}), "
            f"{phrase(status, 'high', True)} the limit {fmt(cfg.paired_max_share)}"
        )
        return GateResult(
            name="latency.paired",
            slice=AGGREGATE,
            status=status,
            statistic=share,
            threshold=cfg.paired_max_share,
            n=int(n),
            confidence=1.0 - (self.settings.alpha_pass if status is Status.PASS else alpha),
            method=PAIRED_METHOD,
            reason=reason,
            blocking=cfg.blocking,
            insufficient=not enough,
            cs=d.cs.cell(0),
            details={
                "alpha": alpha,
                "log_e_fail": float(d.log_e_fail[0]),
                "log_e_pass": float(d.log_e_pass[0]),
            },
        )

    def _merge(self, other: LatencyGate) -> None:
        for k in self.hist:
            self.hist[k] = self.hist[k] + other.hist[k]
        self.paired = self.paired + other.paired

    def _state(self) -> dict[str, Any]:
        # sparse: most of the ~530 buckets are empty
        out: dict[str, Any] = {
            k: {str(i): float(v[i]) for i in np.flatnonzero(v)} for k, v in self.hist.items()
        }
        out["paired"] = self.paired.tolist()
        return out

    def _load(self, state: dict[str, Any]) -> None:
        self.paired = np.asarray(state.get("paired", [0.0, 0.0]), dtype=np.float64)
        for k in self.hist:
            arr = np.zeros(len(LAT_EDGES))
            for i, v in state.get(k, {}).items():
                arr[int(i)] = float(v)
            self.hist[k] = arr


class ErrorGate(Gate):
    family = "errors"

    @property
    def enabled(self) -> bool:
        return self.settings.errors.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.errors.blocking

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # per check: n, sum d, sum d^2, champion failures, candidate failures
        self.sums = {"error": np.zeros(5), "timeout": np.zeros(5)}

    def _update(self, batch: PairBatch) -> None:
        m = batch.observed
        if not m.any():
            return
        # One observation per request, as for latency: the B rows of a batched request
        # share its two calls, and a failed call marks every row; counted B times, one
        # failure looked like B independent ones. A side failed the request if any of
        # its rows failed (an output fault can be one row's). The request is counted in
        # the batch holding its first row, so one split over two batches counts once.
        if batch.request is None or batch.first_row is None:
            groups, first = np.arange(batch.n), np.ones(batch.n, dtype=bool)
        else:
            groups, first = batch.request, batch.first_row
        k = int(groups.max()) + 1
        counted = np.bincount(groups, weights=first & m, minlength=k) > 0
        n = float(counted.sum())
        if n == 0:
            return
        for check, (c, a) in {
            "error": (batch.champion_error, batch.candidate_error),
            "timeout": (batch.champion_timeout, batch.candidate_timeout),
        }.items():
            cf = (np.bincount(groups, weights=c & m, minlength=k)[counted] > 0).astype(np.float64)
            af = (np.bincount(groups, weights=a & m, minlength=k)[counted] > 0).astype(np.float64)
            d = af - cf
            self.sums[check] += np.array([n, d.sum(), (d * d).sum(), cf.sum(), af.sum()])

    def _compute(self) -> list[GateResult]:
        cfg = self.settings.errors
        if not cfg.enabled:
            return []
        out = []
        limits = {"error": cfg.max_excess_error_rate, "timeout": cfg.max_excess_timeout_rate}
        a_check = self.alpha / len(limits)
        rows = np.array([self.sums[c] for c in limits])
        if rows[0, 0] <= 0:
            return []
        d = decide(  # both checks in one vectorised call
            "ternary",
            rows[:, 0],
            rows[:, 1],
            rows[:, 2],
            np.array(list(limits.values())),
            a_check,
            self.settings.alpha_pass,
            "high",
        )
        for i, (check, limit) in enumerate(limits.items()):
            n, s1, _, fc, fa = rows[i]
            enough = n >= cfg.min_samples
            # betting e-process: valid from the first pair, only a PASS waits for the floor
            status = status_of(bool(d.fail[i]), bool(d.passed[i]) and bool(enough), True)
            word = (
                f"INCONCLUSIVE (n={int(n)} < {cfg.min_samples} to PASS)"
                if status is Status.INCONCLUSIVE and not enough
                else status.value
            )
            est = s1 / n
            reason = (
                f"{word}: candidate {check} rate {fmt(fa / n)} vs champion {fmt(fc / n)} on the "
                f"same requests: excess {fmt(est)} (n={int(n)}), "
                f"{phrase(status, 'high', bool(enough))} the limit {fmt(limit)}"
            )
            out.append(
                GateResult(
                    name=f"errors.{check}_rate",
                    slice=AGGREGATE,
                    status=status,
                    statistic=est,
                    threshold=limit,
                    n=int(n),
                    confidence=1.0
                    - (self.settings.alpha_pass if status is Status.PASS else a_check),
                    method=ERROR_METHOD,
                    reason=reason,
                    blocking=cfg.blocking,
                    insufficient=not enough,
                    cs=d.cs.cell(i),
                    details={
                        "champion_rate": fc / n,
                        "candidate_rate": fa / n,
                        "alpha": a_check,
                    },
                )
            )
        return out

    def _merge(self, other: ErrorGate) -> None:
        for k in self.sums:
            self.sums[k] = self.sums[k] + other.sums[k]

    def _state(self) -> dict[str, Any]:
        return {k: v.tolist() for k, v in self.sums.items()}

    def _load(self, state: dict[str, Any]) -> None:
        for k in self.sums:
            if k in state:
                self.sums[k] = np.asarray(state[k], dtype=np.float64)
