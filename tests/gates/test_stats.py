"""The e-processes' guarantees, checked by simulation at EVERY look, and their algebra.

Each validity test runs many seeded streams at the least favourable point of the null
(the boundary), evaluates the e-process after every single observation, and asserts that
the share of streams that ever reject stays <= alpha + 3 standard errors. The same
streams re-tested with a naive fixed-sample z-test at every look must exceed alpha
clearly: this shows the simulation can see the inflation it guards against.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from gates.stats import (
    DEFAULT_LAMBDAS,
    binary_log_e,
    log_threshold,
    mean_cs,
    mean_log_e,
    quantile_bounds,
    rate_cs,
    rate_log_e,
    ternary_log_e,
)

ALPHA = 0.05
STREAMS, LOOKS = 1000, 1000


def band(alpha: float, streams: int) -> float:
    return alpha + 3.0 * np.sqrt(alpha * (1 - alpha) / streams)


def naive_every_look(x: np.ndarray, theta: float, lower_tail: bool, start: int = 30) -> float:
    """Fixed-sample one-sided z-test at level ALPHA re-run after every observation."""
    n = np.arange(1, x.shape[1] + 1)[None, :]
    mean = np.cumsum(x, axis=1) / n
    var = np.cumsum(x * x, axis=1) / n - mean**2
    z = (mean - theta) / np.sqrt(np.maximum(var, 1e-12) / n)
    hit = z < norm.ppf(ALPHA) if lower_tail else z > norm.ppf(1 - ALPHA)
    return float(hit[:, start:].any(axis=1).mean())


def test_fan_inequality_holds_on_a_grid():
    lam = np.linspace(0, 0.999, 300)[:, None]
    y = np.concatenate([np.linspace(-1, 5, 2000), np.geomspace(5, 1e4, 300)])[None, :]
    psi = -np.log1p(-lam) - lam
    assert np.max(lam * y - psi * y**2 - np.log1p(lam * y)) <= 1e-12


@pytest.mark.parametrize(("p_minus", "p_plus"), [(0.06, 0.04), (0.02, 0.0)])
def test_paired_betting_e_process_is_valid_at_every_look(p_minus, p_plus):
    # paired differences with mean exactly -margin: the boundary of "candidate no worse"
    margin = p_minus - p_plus
    rng = np.random.default_rng(11)
    u = rng.random((STREAMS, LOOKS))
    d = np.where(u < p_minus, -1.0, np.where(u < p_minus + p_plus, 1.0, 0.0))
    n = np.arange(1, LOOKS + 1)[None, :]
    s1, s2 = np.cumsum(d, axis=1), np.cumsum(d * d, axis=1)
    fail = ternary_log_e(n, s1, s2, -margin, "less") >= log_threshold(ALPHA)
    rate = fail.any(axis=1).mean()
    assert rate <= band(ALPHA, STREAMS)
    if p_plus > 0:
        assert naive_every_look(d, -margin, lower_tail=True) > 2 * ALPHA


@pytest.mark.parametrize(("p0", "side"), [(0.02, "greater"), (0.3, "less")])
def test_rate_mixture_is_valid_at_every_look(p0, side):
    looks = 500  # the incomplete beta function is the expensive part
    rng = np.random.default_rng(12)
    x = (rng.random((STREAMS, looks)) < p0).astype(float)
    n = np.arange(1, looks + 1)[None, :]
    k = np.cumsum(x, axis=1)
    thr = log_threshold(ALPHA)
    assert (rate_log_e(n, k, p0, side) >= thr).any(axis=1).mean() <= band(ALPHA, STREAMS)
    assert (binary_log_e(n, k, p0, side) >= thr).any(axis=1).mean() <= band(ALPHA, STREAMS)
    if side == "less":
        assert naive_every_look(x, p0, lower_tail=True) > 2 * ALPHA


def test_fan_mixture_is_valid_for_continuous_bounded_values():
    # clipped-error differences: continuous values in [-1, 2] with mean exactly 0
    rng = np.random.default_rng(13)
    x = rng.uniform(-1.0, 1.0, (STREAMS, LOOKS // 2))
    n = np.arange(1, x.shape[1] + 1)[None, :]
    s1, s2 = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)
    thr = log_threshold(ALPHA)
    for side in ("greater", "less"):
        rej = mean_log_e(n, s1, s2, 0.0, -1.0, 2.0, side) >= thr
        assert rej.any(axis=1).mean() <= band(ALPHA, STREAMS)


def test_betting_dominates_fan_on_ternary_data():
    rng = np.random.default_rng(3)
    n = rng.integers(1, 5000, 200).astype(float)
    s2 = np.floor(rng.uniform(0, 1, 200) * n)
    s1 = np.round(rng.uniform(-0.5, 0.5, 200) * s2)
    for side in ("greater", "less"):
        # same bets: term by term, 1 + l*y >= exp(l*y - psi(l)*y^2)
        tern = ternary_log_e(n, s1, s2, -0.01, side, DEFAULT_LAMBDAS)
        fan = mean_log_e(n, s1, s2, -0.01, -1.0, 1.0, side)
        assert np.all(tern >= fan - 1e-9)


def test_no_data_is_no_evidence():
    assert ternary_log_e(0, 0, 0, 0.0, "greater") == pytest.approx(0.0)
    assert rate_log_e(0, 0, 0.1, "greater") == pytest.approx(0.0)
    assert mean_log_e(0, 0, 0, 0.0, -1, 1, "less") == pytest.approx(0.0)


def test_confidence_sequence_brackets_the_estimate_and_matches_the_test():
    rng = np.random.default_rng(4)
    n = rng.integers(10, 20000, 300).astype(float)
    s2 = np.floor(rng.uniform(0.01, 1, 300) * n)
    s1 = np.round(rng.uniform(-0.8, 0.8, 300) * s2)
    lower, upper = mean_cs(n, s1, s2, -1.0, 1.0, ALPHA, ALPHA, ternary=True)
    mean = s1 / n
    assert np.all(lower <= mean + 1e-12) and np.all(mean <= upper + 1e-12)
    # a threshold below the lower end is rejected by the "greater" test, above it is not
    thr = log_threshold(ALPHA)
    inside = np.clip(lower - 1e-3, -0.999, 0.999)
    ok = lower > -0.998
    assert np.all(ternary_log_e(n, s1, s2, inside, "greater")[ok] >= thr)
    above = np.clip(lower + 1e-3, -0.999, 0.999)
    assert np.all(ternary_log_e(n, s1, s2, above, "greater")[ok & (above < mean)] < thr)
    k = np.floor(rng.uniform(0, 0.2, 300) * n)
    lo_r, up_r = rate_cs(n, k, ALPHA, ALPHA)
    assert np.all(lo_r <= k / n + 1e-12) and np.all(k / n <= up_r + 1e-12)


def test_rejection_regions_are_intervals():
    # the CS hull by bisection is only right if {theta: rejected} touches the range's end
    rng = np.random.default_rng(5)
    n = rng.integers(1, 20000, 200).astype(float)
    s2 = np.floor(rng.uniform(0, 1, 200) * n)
    s1 = np.round(rng.uniform(-1, 1, 200) * s2 * 0.3)
    theta = np.linspace(-0.999, 0.999, 1500)[:, None]
    thr = log_threshold(ALPHA)
    for side in ("greater", "less"):
        r = ternary_log_e(n[None], s1[None], s2[None], theta, side) >= thr
        assert np.abs(np.diff(r.astype(int), axis=0)).sum(axis=0).max() <= 1
    k = np.floor(rng.uniform(0, 1, 200) * n)
    p = np.linspace(1e-4, 1 - 1e-4, 1500)[:, None]
    for side in ("greater", "less"):
        r = rate_log_e(n[None], k[None], p, side) >= thr
        assert np.abs(np.diff(r.astype(int), axis=0)).sum(axis=0).max() <= 1


def test_quantile_bounds_cover_the_true_quantile_at_every_look():
    edges = np.append(np.linspace(0.05, 10, 200), np.inf)
    rng = np.random.default_rng(6)
    q, alpha, streams, looks, step = 0.95, 0.1, 150, 20, 100
    true_q = -np.log(1 - q)  # exponential(1)
    misses = 0
    for _ in range(streams):
        x = rng.exponential(1.0, looks * step)
        idx = np.searchsorted(edges, x, side="left")
        counts = np.zeros(len(edges))
        missed = False
        for t in range(looks):
            np.add.at(counts, idx[t * step : (t + 1) * step], 1)
            lower, upper = quantile_bounds(counts, edges, q, alpha)
            if not lower[0] < true_q <= upper[0]:
                missed = True
        misses += missed
    assert misses / streams <= band(alpha, streams)


def test_lambda_grid_is_inside_the_unit_interval():
    assert DEFAULT_LAMBDAS.max() < 1 and DEFAULT_LAMBDAS.min() > 0


@pytest.mark.parametrize(
    ("p_neg", "p_pos", "theta"),
    [(0.0561, 0.0261, -0.01), (0.1725, 0.0225, -0.01), (0.08, 0.05, -0.02), (0.3, 0.1, 0.0)],
)
def test_linear_bets_are_the_best_e_variables_for_the_ternary_null(p_neg, p_pos, theta):
    # Why no count test on discordant pairs (or any other bet) can grow faster than the
    # mixture's bets: among ALL e-variables f on {-1, 0, 1} for H0: E d >= theta (E_Q f <= 1
    # at the null's four vertices), the one with the largest growth E_P log f is linear in
    # d, 1 + l (theta - d) / (1 - theta). scipy's SLSQP over every f is the oracle.
    from scipy.optimize import minimize, minimize_scalar

    p = np.array([p_neg, 1.0 - p_neg - p_pos, p_pos])  # P(d = -1), P(0), P(+1)
    t = -theta
    vertices = np.array(
        [[t, 1.0 - t, 0.0], [(1.0 + t) / 2.0, 0.0, (1.0 - t) / 2.0], [0, 1, 0], [0, 0, 1]]
    )  # E_Q d = theta on the first two; the point masses at 0 and +1
    # over g = log f (so f > 0), the growth scaled to order 1; SLSQP ends on its line
    # search at this precision, so the answer is checked (feasible, value), not its flag
    best_any = minimize(
        lambda g: -1e3 * (p @ g),
        x0=np.log(np.full(3, 0.9)),
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda g: 1.0 - vertices @ np.exp(g)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    f = np.exp(best_any.x)
    f /= max(1.0, float(np.max(vertices @ f)))  # exactly feasible: a valid e-variable
    growth_any = float(p @ np.log(f))
    y = (theta - np.array([-1.0, 0.0, 1.0])) / (1.0 - theta)
    best_linear = minimize_scalar(
        lambda lam: -p @ np.log1p(lam * y), bounds=(0.0, 1.0 - 1e-9), method="bounded"
    )
    # the optimiser finds nothing better than the best linear bet, and reaches it
    assert growth_any <= -best_linear.fun * (1 + 1e-6) + 1e-12
    assert growth_any >= -best_linear.fun * (1 - 1e-3)
    assert f[2] - f[1] == pytest.approx(f[1] - f[0], abs=1e-4)  # affine in d
    # and the gates' own ternary e-process holds that bet: at the counts n * p its best
    # grid bet grows at least 99% as fast as the optimum
    n = 1e5
    counts = n * p
    s1, s2 = counts[2] - counts[0], counts[2] + counts[0]
    lams = np.linspace(0.001, 0.999, 999)
    le = ternary_log_e(n, s1, s2, theta, "less", lambdas=lams) + np.log(len(lams))
    assert le / n >= 0.99 * -best_linear.fun


def test_ternary_limit_tables_are_bounded_and_exact() -> None:
    """The per-limit tables are a cache: at most ``_TABLES_MAX`` of them whatever the
    number of distinct limits seen (a data-dependent limit is new at every evaluation),
    and a cached table gives what the direct computation gives."""
    from gates import stats

    rng = np.random.default_rng(7)
    n, s2 = np.array([50.0, 80.0]), np.array([20.0, 30.0])
    s1 = np.array([4.0, -6.0])
    thetas = rng.uniform(-0.5, 0.5, size=3 * stats._TABLES_MAX)
    for theta in thetas:
        cached = stats.ternary_log_e(n, s1, s2, float(theta), "greater")
        # 9 distinct limits take the direct path (no table): the oracle.
        many = np.concatenate([[theta], rng.uniform(-0.5, 0.5, size=8)])
        direct = stats.ternary_log_e(
            np.full(9, n[0]), np.full(9, s1[0]), np.full(9, s2[0]), many, "greater"
        )
        assert cached[0] == pytest.approx(direct[0], rel=1e-12, abs=1e-12)
        assert len(stats._TABLES) <= stats._TABLES_MAX
