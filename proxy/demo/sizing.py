"""How many labelled pairs a slice gate needs before it can decide: sizing the scenarios.

The model of a gate (what the gates brief specifies; docs/gates.md has the real one):
a paired difference x_i = [candidate correct] - [champion correct] in {-1, 0, 1} per
labelled pair, mean Δ (the accuracy difference), discordance q = P(x_i != 0), so
Var x = q - Δ². A non-inferiority gate with margin m FAILs once an anytime-valid
confidence sequence lies entirely below -m and PASSes once it lies entirely above -m.
Each side is an e-process for a one-sided null, here the one the gates brief suggests:
Fan et al.'s bound exp(λy - ψ(λ)y²) <= 1 + λy for y >= -1, ψ(λ) = -log(1-λ) - λ, with
y_i the pair's difference shifted by the null boundary -m and scaled into [-1, ∞),
averaged over a grid of λ. Ville's inequality makes "reject when E_n >= 1/alpha" valid at
every look.

Under the alternative the log of each grid term grows linearly in n at rate
λ·E[y] - ψ(λ)·E[y²], so the expected-path crossing time solves
log(mean_j exp(n·r_j)) = log(1/alpha). That is a planning estimate (the path's noise makes
the real crossing time spread around it; ``benchmarks/demo_sizing.py`` simulates the
whole distribution on the demo's own pool); size scenarios with a safety factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A grid from cautious to aggressive bets; the mixture pays log(len) at worst for not
# knowing the best λ in advance.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(v) for v in np.linspace(0.05, 0.95, 19))


def _psi(lam: np.ndarray) -> np.ndarray:
    return np.asarray(-np.log1p(-lam) - lam)


def log_mixture_e(
    s: np.ndarray | float, v: np.ndarray | float, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
) -> np.ndarray:
    """log of mean_j exp(λ_j S - ψ(λ_j) V) for sums S = Σy, V = Σy² (broadcast)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    s_arr = np.asarray(s, dtype=np.float64)[..., None]
    v_arr = np.asarray(v, dtype=np.float64)[..., None]
    terms = lam * s_arr - _psi(lam) * v_arr
    top = terms.max(axis=-1)
    return np.asarray(top + np.log(np.exp(terms - top[..., None]).mean(axis=-1)))


def shifted_moments(
    delta: float, discordance: float, boundary: float, side: str
) -> tuple[float, float]:
    """E[y] and E[y²] of the scaled pair difference for one side's null.

    ``side="below"``: evidence that the mean is below ``boundary`` (FAIL when boundary is
    -m); ``side="above"``: evidence that it is above (PASS).
    """
    if not 0.0 <= discordance <= 1.0 or abs(delta) > discordance + 1e-12:
        raise ValueError("need 0 <= discordance <= 1 and |delta| <= discordance")
    if not -1.0 < boundary < 1.0:
        raise ValueError("boundary must lie in (-1, 1)")
    var = discordance - delta * delta
    if side == "below":
        shift, scale = boundary - delta, 1.0 - boundary  # y = (b - x) / (1 - b) >= -1
    elif side == "above":
        shift, scale = delta - boundary, 1.0 + boundary  # y = (x - b) / (1 + b) >= -1
    else:
        raise ValueError("side must be 'below' or 'above'")
    return shift / scale, (var + shift * shift) / (scale * scale)


def expected_pairs_to_decide(
    delta: float,
    discordance: float,
    margin: float,
    alpha: float,
    *,
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
) -> float:
    """Labelled pairs on a slice until its non-inferiority gate decides (planning estimate).

    ``delta`` the true accuracy difference (candidate - champion) on the slice,
    ``discordance`` the share of pairs where exactly one model is right, ``margin`` the
    non-inferiority margin m, ``alpha`` the error rate spent on this side of this gate.
    Returns ``inf`` when Δ == -m (no gate can ever decide).
    """
    if not 0.0 < alpha < 1.0 or margin < 0:
        raise ValueError("need 0 < alpha < 1 and margin >= 0")
    boundary = -margin
    if math.isclose(delta, boundary):
        return math.inf
    side = "below" if delta < boundary else "above"
    mean_y, mean_y2 = shifted_moments(delta, discordance, boundary, side)
    target = math.log(1.0 / alpha)
    lam = np.asarray(lambdas)
    rates = lam * mean_y - _psi(lam) * mean_y2
    if rates.max() <= 0:
        return math.inf
    lo, hi = 0.0, 1.0
    while float(log_mixture_e(hi * mean_y, hi * mean_y2, lambdas)) < target:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(log_mixture_e(mid * mean_y, mid * mean_y2, lambdas)) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True, slots=True)
class SliceNeed:
    """What one slice gate needs, and what that means in scenario traffic."""

    slice: str
    delta: float
    discordance: float
    pairs: float  # labelled pairs on the slice
    rows: float  # traffic rows (pairs) of all slices, given the share and label rate

    def requests(self, mean_rows_per_request: float) -> float:
        return self.rows / mean_rows_per_request


def slice_need(
    slice_name: str,
    delta: float,
    discordance: float,
    share: float,
    label_rate: float,
    *,
    margin: float,
    alpha: float,
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
) -> SliceNeed:
    """:func:`expected_pairs_to_decide` turned into rows of traffic of all slices."""
    if not 0 < share <= 1 or not 0 < label_rate <= 1:
        raise ValueError("share and label_rate must lie in (0, 1]")
    pairs = expected_pairs_to_decide(delta, discordance, margin, alpha, lambdas=lambdas)
    return SliceNeed(slice_name, delta, discordance, pairs, pairs / (share * label_rate))
