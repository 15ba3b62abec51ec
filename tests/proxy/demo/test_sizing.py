"""The sizing model: an honest e-process, and estimates that track simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from proxy.demo.sizing import (
    expected_pairs_to_decide,
    log_mixture_e,
    shifted_moments,
    slice_need,
)


def _paired_draws(rng: np.random.Generator, delta: float, q: float, shape: tuple) -> np.ndarray:
    """Paired differences in {-1, 0, 1}: P(+1) = (q + Δ)/2, P(-1) = (q - Δ)/2."""
    u = rng.random(shape)
    up, down = (q + delta) / 2, (q - delta) / 2
    return np.where(u < up, 1.0, np.where(u < up + down, -1.0, 0.0))


def _crossed(d: np.ndarray, boundary: float, alpha: float, side: str) -> np.ndarray:
    if side == "below":
        y = (boundary - d) / (1 - boundary)
    else:
        y = (d - boundary) / (1 + boundary)
    log_e = log_mixture_e(np.cumsum(y, axis=1), np.cumsum(y * y, axis=1))
    return np.asarray(log_e >= math.log(1 / alpha))


def test_e_process_keeps_its_error_rate_at_every_look() -> None:
    """A/A at the null boundary, watched after every pair: the share of streams that ever
    cross 1/alpha stays below alpha (Ville), for both sides."""
    rng = np.random.default_rng(2024)
    alpha, margin = 0.2, 0.02
    d = _paired_draws(rng, -margin, 0.15, (400, 600))
    for side in ("below", "above"):
        ever = _crossed(d, -margin, alpha, side).any(axis=1)
        assert ever.mean() <= alpha, side


def test_estimate_tracks_the_simulated_median() -> None:
    rng = np.random.default_rng(7)
    delta, q, margin, alpha = -0.09, 0.18, 0.02, 0.01
    est = expected_pairs_to_decide(delta, q, margin, alpha)
    d = _paired_draws(rng, delta, q, (200, 4 * int(est)))
    hit = _crossed(d, -margin, alpha, "below")
    assert hit.any(axis=1).all()
    median = float(np.median(hit.argmax(axis=1) + 1))
    assert 0.7 * est < median < 1.3 * est


def test_estimates_move_the_right_way() -> None:
    base = expected_pairs_to_decide(-0.07, 0.17, 0.02, 0.00625)
    assert expected_pairs_to_decide(-0.10, 0.17, 0.02, 0.00625) < base  # bigger regression
    assert expected_pairs_to_decide(-0.07, 0.17, 0.02, 0.05) < base  # looser alpha
    assert expected_pairs_to_decide(-0.07, 0.17, 0.04, 0.00625) > base  # gap shrinks
    assert expected_pairs_to_decide(-0.07, 0.25, 0.02, 0.00625) > base  # noisier pairs
    assert math.isinf(expected_pairs_to_decide(-0.02, 0.1, 0.02, 0.05))


def test_slice_need_scales_by_share_and_label_rate() -> None:
    need = slice_need("mobile", -0.07, 0.17, 0.2, 0.8, margin=0.02, alpha=0.00625)
    assert need.rows == pytest.approx(need.pairs / 0.16)
    assert need.requests(4.0) == pytest.approx(need.rows / 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.3, 0.1, -0.02, "below"), "discordance"),
        ((0.0, 0.1, 1.0, "below"), "boundary"),
        ((0.0, 0.1, -0.02, "sideways"), "side"),
    ],
)
def test_bad_moment_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shifted_moments(*args)


def test_bad_sizing_arguments() -> None:
    with pytest.raises(ValueError):
        expected_pairs_to_decide(-0.05, 0.1, 0.02, 0.0)
    with pytest.raises(ValueError):
        slice_need("x", -0.05, 0.1, 0.0, 0.8, margin=0.02, alpha=0.05)
