"""Anytime-valid building blocks: e-processes and confidence sequences from sufficient stats.

Everything here is a pure, vectorised function of *sufficient statistics* (counts and sums),
so the gate states that feed it are exactly mergeable and independent of arrival order.

Two e-processes are used, both nonnegative supermartingales under their null, so Ville's
inequality gives ``P(exists t: E_t >= 1/alpha) <= alpha``: a test that rejects the first
time ``E_t >= 1/alpha`` keeps its error rate however often it is looked at.

* Bounded means (paired differences, clipped errors): Fan, Grama & Liu (2015) show
  ``exp(l*y - psi(l)*y^2) <= 1 + l*y`` for ``y >= -1`` and ``l in [0, 1)`` with
  ``psi(l) = -log(1-l) - l``. With ``y_i = (x_i - theta) / c`` (``c`` chosen so that
  ``y_i >= -1``) and ``E[x_i | past] <= theta``, the product over i is a supermartingale
  for every fixed ``l``; it equals ``exp(l*S - psi(l)*V)`` with ``S = sum y``,
  ``V = sum y^2``, which depend only on ``(n, sum x, sum x^2)``. A uniform mixture over a
  fixed geometric grid of ``l`` is still a supermartingale and adapts to the unknown
  effect size and variance (an empirical-Bernstein-like width).
* Paired differences on ``{-1, 0, 1}`` (one model right, the other wrong): the exact
  betting martingale ``prod (1 + l*y_i)`` (Waudby-Smith & Ramdas 2023) only depends on
  the three counts, i.e. on ``(n, sum x, sum x^2)`` again, and dominates Fan's bound
  term by term (``exp(l*y - psi*y^2) <= 1 + l*y``), so it is used for every ternary
  statistic, mixed over :data:`TERNARY_LAMBDAS`; Fan's form is kept for continuous
  bounded values (clipped errors).
* Bernoulli rates: the likelihood ratio ``prod (p/p0)^x ((1-p)/(1-p0))^(1-x)`` has
  expectation <= 1 for every alternative ``p >= p0`` whenever the true rate is <= p0, so its
  mixture over a uniform prior on ``[p0, 1]`` (closed form with the incomplete beta
  function) is an exact e-process for ``H0: rate <= p0`` depending only on ``(n, k)``.
  The mirror image (prior on ``[0, p0]``) tests ``H0: rate >= p0``.

Confidence sequences are the sets of parameter values not rejected; we report their hull
by vectorised bisection (display only: decisions always use the e-value at the threshold).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betainc, betaincc, betaln

Side = Literal["greater", "less"]
FloatArray = NDArray[np.float64]

# sqrt(2)-spaced grid: the best grid point is within a factor sqrt(2) of the optimal l,
# which keeps >= 91% of the optimal exponent; 24 points cost log(24) ~ 3.2 nats.
DEFAULT_LAMBDAS: FloatArray = 0.95 * 2.0 ** (-0.5 * np.arange(24, dtype=np.float64))


# Paired {-1, 0, 1} differences: 40 bets evenly spaced on [0.02, 0.95] plus the geometric
# grid above, uniform over all 64. The bet that detects a practically sized regression
# (a few points against a margin of 1-2, 5-30% discordant pairs) lies in 0.05-0.6, where
# the even part puts most of the prior mass (a mixture pays log(1/mass near the best bet));
# the geometric tail keeps the adaptivity to tiny effects. Any fixed prior keeps the
# mixture an e-process; on the docs' slice regression it raised power within 60k pairs
# from 0.845 to 0.865 at the same level (docs/gates.md, "Issue 13 scenarios").
TERNARY_LAMBDAS: FloatArray = np.concatenate([np.linspace(0.02, 0.95, 40), DEFAULT_LAMBDAS])


def _psi(lambdas: FloatArray) -> FloatArray:
    return -np.log1p(-lambdas) - lambdas


_DEFAULT_PSI = _psi(DEFAULT_LAMBDAS)


def log_threshold(alpha: ArrayLike) -> FloatArray:
    """Ville's rejection level ``log(1/alpha)`` for an e-process."""
    return -np.log(np.asarray(alpha, dtype=np.float64))


def _mix(terms: FloatArray) -> FloatArray:
    """log of the uniform mixture over the first (grid) axis: a stable log-mean-exp."""
    top = np.max(terms, axis=0)
    if not np.isfinite(top).all():
        top = np.where(np.isfinite(top), top, 0.0)
    out: FloatArray = top + np.log(np.exp(terms - top).sum(axis=0)) - np.log(terms.shape[0])
    return out


def mean_log_e(
    n: ArrayLike,
    s1: ArrayLike,
    s2: ArrayLike,
    theta: ArrayLike,
    lo: float,
    hi: float,
    side: Side,
    lambdas: FloatArray = DEFAULT_LAMBDAS,
) -> FloatArray:
    """log of the Fan-mixture e-process for a mean of values in ``[lo, hi]``.

    ``side="greater"`` gathers evidence *against* ``H0: mean <= theta`` (for a mean above
    theta); ``side="less"`` against ``H0: mean >= theta``. ``n, s1, s2`` are the count, sum
    and sum of squares of the observations; all inputs broadcast. ``theta`` must lie strictly
    inside ``(lo, hi)``.
    """
    n_a, s1_a, s2_a, th = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (n, s1, s2, theta))
    )
    if side == "greater":
        c = th - lo
        s = (s1_a - n_a * th) / c
    else:
        c = hi - th
        s = (n_a * th - s1_a) / c
    # sum (x - theta)^2 from the raw moments; clip tiny negative rounding.
    v = np.maximum(s2_a - 2.0 * th * s1_a + n_a * th * th, 0.0) / (c * c)
    psi = _DEFAULT_PSI if lambdas is DEFAULT_LAMBDAS else _psi(lambdas)
    shape = (-1,) + (1,) * s.ndim
    return _mix(lambdas.reshape(shape) * s - psi.reshape(shape) * v)


def _ternary_table(theta: float, side: Side, lambdas: FloatArray) -> FloatArray:
    """``log(1 + l*y)`` for the three values' ``y`` at one theta: (grid, 3)."""
    key = (theta, side, id(lambdas))
    table = _TABLES.get(key)
    if table is None:
        if side == "greater":
            c = theta + 1.0
            ys = np.array([(1.0 - theta) / c, -theta / c, (-1.0 - theta) / c])
        else:
            c = 1.0 - theta
            ys = np.array([(theta - 1.0) / c, theta / c, (theta + 1.0) / c])
        table = np.log1p(lambdas[:, None] * ys[None, :])
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = table
    return table


# The tables of recent limits. An evaluation uses a few limits (one per check), but a
# data-dependent limit changes with every evaluation, so old tables are rarely used
# again: 4,096 of them (~1.7 KiB each with the 64-point grid, ~7 MiB) filled over a
# soak's first ~20k requests and were then cleared and refilled. 256 is ~0.4 MiB.
_TABLES_MAX = 256
_TABLES: dict[tuple[float, str, int], FloatArray] = {}


def ternary_log_e(
    n: ArrayLike,
    s1: ArrayLike,
    s2: ArrayLike,
    theta: ArrayLike,
    side: Side,
    lambdas: FloatArray = TERNARY_LAMBDAS,
) -> FloatArray:
    """log of the betting-mixture e-process for the mean of values in ``{-1, 0, 1}``.

    ``n, s1, s2`` are the count, sum and sum of squares (``s2`` = number of nonzero
    values), so the counts of +1 / -1 are ``(s2 +- s1) / 2``. Sides as in
    :func:`mean_log_e`; ``theta`` strictly inside ``(-1, 1)``.
    """
    if np.ndim(theta) == 0:
        # one limit for every cell (the common case): a (grid x 3) table times the counts
        n_b, s1_b, s2_b = np.broadcast_arrays(
            *(np.asarray(a, dtype=np.float64) for a in (n, s1, s2))
        )
        counts = np.stack([0.5 * (s2_b + s1_b), n_b - s2_b, 0.5 * (s2_b - s1_b)])
        table = _ternary_table(float(np.asarray(theta)), side, lambdas)
        flat = table @ counts.reshape(3, -1)
        return _mix(flat).reshape(n_b.shape)
    n_a, s1_a, s2_a, th = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (n, s1, s2, theta))
    )
    n_pos = 0.5 * (s2_a + s1_a)
    n_neg = 0.5 * (s2_a - s1_a)
    n_zero = n_a - s2_a
    thetas = np.unique(th)
    if len(thetas) <= 8 and n_a.size >= len(thetas):
        # Few limits (the usual case: one margin per check): log(1 + l*y) depends only on
        # theta, so each mixture term is a (grid x 3) table times the three counts.
        counts = np.stack([n_pos.ravel(), n_zero.ravel(), n_neg.ravel()])
        flat_th = th.ravel()
        terms = np.empty((len(lambdas), n_a.size))
        for t in thetas:
            cols = flat_th == t
            terms[:, cols] = _ternary_table(float(t), side, lambdas) @ counts[:, cols]
        return _mix(terms).reshape(n_a.shape)
    if side == "greater":
        c = th + 1.0
        y_pos, y_zero, y_neg = (1.0 - th) / c, -th / c, (-1.0 - th) / c
    else:
        c = 1.0 - th
        y_pos, y_zero, y_neg = (th - 1.0) / c, th / c, (th + 1.0) / c
    lam = lambdas.reshape((-1,) + (1,) * n_a.ndim)
    terms = (
        n_pos * np.log1p(lam * y_pos)
        + n_zero * np.log1p(lam * y_zero)
        + n_neg * np.log1p(lam * y_neg)
    )
    return _mix(terms)


def rate_log_e(n: ArrayLike, k: ArrayLike, p0: ArrayLike, side: Side) -> FloatArray:
    """log of the truncated-uniform beta-binomial mixture e-process for a Bernoulli rate.

    ``side="greater"``: evidence against ``H0: p <= p0``; ``"less"``: against ``p >= p0``.
    ``p0`` strictly inside (0, 1). Exact (no approximation beyond floating point).
    """
    n_a, k_a, p = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (n, k, p0)))
    a = k_a + 1.0
    b = n_a - k_a + 1.0
    base = betaln(a, b) - k_a * np.log(p) - (n_a - k_a) * np.log1p(-p)
    with np.errstate(divide="ignore"):
        if side == "greater":
            tail = np.log(betaincc(a, b, p)) - np.log1p(-p)
        else:
            tail = np.log(betainc(a, b, p)) - np.log(p)
    out: FloatArray = base + tail
    return out


def binary_log_e(n: ArrayLike, k: ArrayLike, p0: ArrayLike, side: Side) -> FloatArray:
    """Betting-mixture e-process for a Bernoulli rate (``k`` successes of ``n``).

    The ternary e-process on ``2x - 1`` in {-1, 1} with ``theta = 2*p0 - 1``: cheaper than
    the beta mixture (no incomplete beta), increasing in ``k`` for "greater" and
    decreasing for "less"; used where many points are tested at once (quantile bounds).
    """
    n_a, k_a, p = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (n, k, p0)))
    return ternary_log_e(n_a, 2.0 * k_a - n_a, n_a, 2.0 * p - 1.0, side)


# Display precision of confidence-sequence bounds: 2**-26 of the range.
BISECT_ITERATIONS = 26


def _cs(
    log_e: Callable[[FloatArray, Side], FloatArray],
    lo: float,
    hi: float,
    center: FloatArray,
    thr_lower: FloatArray,
    thr_upper: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Both ends of a CS hull in one vectorised bisection.

    The lower end is the largest theta in ``[lo, center]`` still rejected by the
    "greater" test, the upper end the smallest theta in ``[center, hi]`` rejected by the
    "less" test (rejection regions are intervals touching the ends of the range).
    """
    m = center.shape[0]
    # rows 0..m-1: lower ends, rows m..2m-1: upper ends; a = rejected side, b = accepted
    a = np.concatenate([np.full(m, lo), np.full(m, hi)])
    b = np.concatenate([center, center])
    thr = np.concatenate([thr_lower, thr_upper])
    eps = 1e-12 * (hi - lo)
    for _ in range(BISECT_ITERATIONS):
        mid = np.clip(0.5 * (a + b), lo + eps, hi - eps)
        le = np.concatenate([log_e(mid[:m], "greater"), log_e(mid[m:], "less")])
        rej = le >= thr
        a = np.where(rej, mid, a)
        b = np.where(rej, b, mid)
    return a[:m], a[m:]


def mean_cs(
    n: ArrayLike,
    s1: ArrayLike,
    s2: ArrayLike,
    lo: float,
    hi: float,
    alpha_lower: ArrayLike,
    alpha_upper: ArrayLike,
    ternary: bool = False,
) -> tuple[FloatArray, FloatArray]:
    """Confidence-sequence hull ``[L, U]`` for a bounded mean (display; may be trivial).

    ``L`` is valid at level ``alpha_lower`` (from the "greater" test), ``U`` at
    ``alpha_upper`` (from the "less" test). ``ternary=True`` (values in ``{-1, 0, 1}``,
    ``lo=-1, hi=1``) uses the betting form.
    """
    n_a, s1_a, s2_a = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (n, s1, s2))
    )
    thr_l = np.broadcast_to(log_threshold(alpha_lower), n_a.shape)
    thr_u = np.broadcast_to(log_threshold(alpha_upper), n_a.shape)
    center = np.clip(np.where(n_a > 0, s1_a / np.maximum(n_a, 1.0), 0.5 * (lo + hi)), lo, hi)
    nn, ss1, ss2 = (np.concatenate([x, x]) for x in (n_a, s1_a, s2_a))
    m = n_a.shape[0]

    def log_e(theta: FloatArray, side: Side) -> FloatArray:
        rows = slice(0, m) if side == "greater" else slice(m, 2 * m)
        if ternary:
            return ternary_log_e(nn[rows], ss1[rows], ss2[rows], theta, side)
        return mean_log_e(nn[rows], ss1[rows], ss2[rows], theta, lo, hi, side)

    return _cs(log_e, lo, hi, center, thr_l, thr_u)


def rate_cs(
    n: ArrayLike, k: ArrayLike, alpha_lower: ArrayLike, alpha_upper: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Confidence-sequence hull ``[L, U]`` for a Bernoulli rate (display)."""
    n_a, k_a = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (n, k))
    )
    thr_l = np.broadcast_to(log_threshold(alpha_lower), n_a.shape)
    thr_u = np.broadcast_to(log_threshold(alpha_upper), n_a.shape)
    center = np.where(n_a > 0, k_a / np.maximum(n_a, 1.0), 0.5)

    def log_e(p: FloatArray, side: Side) -> FloatArray:
        return rate_log_e(n_a, k_a, p, side)

    return _cs(log_e, 0.0, 1.0, center, thr_l, thr_u)


def quantile_bounds(
    counts: ArrayLike, edges: ArrayLike, q: ArrayLike, alpha: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Anytime-valid bounds ``(L, U]`` on q-quantiles from a fixed-edge histogram.

    ``counts[j]`` counts observations in ``(edges[j-1], edges[j]]`` (``edges`` are the
    upper edges, the last one may be ``inf``). For a *fixed* quantile only one point of
    the CDF matters (Howard & Ramdas 2022): with the Bernoulli betting e-process,
    ``U`` is the first upper edge where ``H0: F(e) <= q`` is rejected, ``L`` the last one
    where ``H0: F(e) >= q`` is; each side holds with probability ``>= 1 - alpha/2``
    uniformly over time. ``L = -inf`` / ``U = inf`` when nothing is rejected yet. ``q`` and
    ``alpha`` broadcast: one answer per pair. ``counts`` may be 2-D (one histogram per
    row): the answers are then ``(rows, pairs)``, computed in one vectorised call.
    """
    c2 = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    e = np.asarray(edges, dtype=np.float64)
    qs, alphas = np.broadcast_arrays(
        np.atleast_1d(np.asarray(q, dtype=np.float64)),
        np.atleast_1d(np.asarray(alpha, dtype=np.float64)),
    )
    rows, m = c2.shape[0], len(qs)
    lower = np.full((rows, m), -np.inf)
    upper = np.full((rows, m), np.inf)
    # The empirical CDF only changes at non-empty buckets, and both rejections are monotone
    # in k, so the first / last rejecting edge is decided at bucket 0 or a non-empty one.
    parts = []
    for r in range(rows):
        n = float(c2[r].sum())
        if n > 0:
            idx = np.union1d([0], np.flatnonzero(c2[r]))
            parts.append((r, n, idx, np.cumsum(c2[r])[idx]))
    if not parts:
        return (lower[0], upper[0]) if np.ndim(counts) == 1 else (lower, upper)
    sizes = [len(p[2]) for p in parts]
    n_all = np.concatenate([np.full(len(p[2]), p[1]) for p in parts])[None, :]
    k_all = np.concatenate([p[3] for p in parts])[None, :]
    thr = log_threshold(alphas / 2.0)[:, None]
    up_all = binary_log_e(n_all, k_all, qs[:, None], "greater") >= thr
    down_all = binary_log_e(n_all, k_all, qs[:, None], "less") >= thr
    start = 0
    for (r, _, idx, _), size in zip(parts, sizes, strict=True):
        up, down = up_all[:, start : start + size], down_all[:, start : start + size]
        start += size
        upper[r] = np.where(up.any(axis=1), e[idx[np.argmax(up, axis=1)]], np.inf)
        # "less" rejects on a prefix of edges; it ends just before the first candidate
        # index that does not reject (every edge up to there has the same or a smaller k).
        first_ok = idx[np.argmin(down, axis=1)]
        lower[r] = np.where(
            down.all(axis=1),
            e[len(e) - 1],
            np.where(first_ok > 0, e[np.maximum(first_ok - 1, 0)], -np.inf),
        )
    if np.ndim(counts) == 1:
        return lower[0], upper[0]
    return lower, upper


# ---------------------------------------------------------------------------------------
# Classical effect sizes and fixed-sample statistics (reported beside the anytime tests)
# ---------------------------------------------------------------------------------------

PSI_EPS = 1e-4


def psi(expected: ArrayLike, actual: ArrayLike, eps: float = PSI_EPS) -> float:
    """Population stability index ``sum (a - e) * ln(a / e)`` over bins of two histograms.

    Counts are turned into proportions; empty bins are floored at ``eps`` (the usual
    textbook convention) so the index stays finite.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    pe = np.maximum(e / e.sum(), eps)
    pa = np.maximum(a / a.sum(), eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def ks_from_counts(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sample KS distance evaluated at the bin edges (exact when bins split every value)."""
    ca = np.asarray(a, dtype=np.float64)
    cb = np.asarray(b, dtype=np.float64)
    if ca.sum() <= 0 or cb.sum() <= 0:
        return 0.0
    fa = np.cumsum(ca) / ca.sum()
    fb = np.cumsum(cb) / cb.sum()
    return float(np.max(np.abs(fa - fb)))


def chi2_from_counts(a: ArrayLike, b: ArrayLike) -> tuple[float, int]:
    """Pearson chi-square statistic and dof of the 2 x K contingency table (no correction)."""
    table = np.vstack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) <= 0).any():
        return 0.0, 0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    return stat, table.shape[1] - 1
