"""Seeded synthetic paired traffic for the statistical tests, benchmarks and docs.

A scenario fixes each model's accuracy per slice, how often the two models' correctness
agrees, latency and error rates, and the input features. Correctness is drawn exactly at
the configured marginals (a shared uniform with probability ``agreement``), so an A/A
scenario has the candidate identical in distribution to the champion.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from gates.batch import PairBatch
from gates.records import ModelResult, PairRecord


@dataclass(frozen=True)
class Scenario:
    n_classes: int = 3
    slice_shares: dict[str, float] = field(
        default_factory=lambda: {"web": 0.6, "ios": 0.3, "android": 0.1}
    )
    champion_accuracy: dict[str, float] = field(
        default_factory=lambda: {"web": 0.9, "ios": 0.9, "android": 0.9}
    )
    candidate_accuracy: dict[str, float] = field(
        default_factory=lambda: {"web": 0.9, "ios": 0.9, "android": 0.9}
    )
    agreement: float = 0.7
    rate_per_s: float = 50.0
    champion_latency_ms: float = 5.0
    candidate_latency_ms: float = 5.0
    champion_error_rate: float = 0.0
    candidate_error_rate: float = 0.0
    age_shift: float = 0.0  # input drift: added to the age feature

    @classmethod
    def aa(cls, accuracy: float = 0.9, **kw: object) -> Scenario:
        acc = {"web": accuracy, "ios": accuracy, "android": accuracy}
        return cls(champion_accuracy=acc, candidate_accuracy=dict(acc), **kw)  # type: ignore[arg-type]

    @classmethod
    def slice_regression(cls, drop: float = 0.03, gain: float = 0.01, **kw: object) -> Scenario:
        """Better on aggregate, worse by ``drop`` on the 10% ``android`` slice."""
        champ = {"web": 0.9, "ios": 0.9, "android": 0.9}
        cand = {"web": 0.9 + gain, "ios": 0.9 + gain, "android": 0.9 - drop}
        return cls(champion_accuracy=champ, candidate_accuracy=cand, **kw)  # type: ignore[arg-type]


def _probs(rng: np.random.Generator, pred: np.ndarray, top: np.ndarray, c: int) -> np.ndarray:
    p = np.repeat(((1.0 - top) / (c - 1))[:, None], c, axis=1)
    p[np.arange(len(pred)), pred] = top
    return p


def generate(
    sc: Scenario, n: int, rng: np.random.Generator, t0: float = 0.0
) -> tuple[PairBatch, dict[str, np.ndarray]]:
    """One chunk of ``n`` labelled pairs as a column batch (and the raw columns)."""
    names = list(sc.slice_shares)
    shares = np.array([sc.slice_shares[k] for k in names])
    s = rng.choice(len(names), size=n, p=shares / shares.sum())
    c = sc.n_classes
    y = rng.integers(0, c, size=n)
    acc_c = np.array([sc.champion_accuracy[k] for k in names])[s]
    acc_a = np.array([sc.candidate_accuracy[k] for k in names])[s]
    u = rng.random(n)
    v = np.where(rng.random(n) < sc.agreement, u, rng.random(n))
    ok_c, ok_a = u < acc_c, v < acc_a
    wrong_c = (y + rng.integers(1, c, size=n)) % c
    wrong_a = np.where(rng.random(n) < sc.agreement, wrong_c, (y + rng.integers(1, c, size=n)) % c)
    pred_c = np.where(ok_c, y, wrong_c)
    pred_a = np.where(ok_a, y, wrong_a)
    top_c = rng.uniform(0.45, 0.99, size=n)
    top_a = np.where(
        pred_a == pred_c,
        np.clip(top_c + rng.normal(0, 0.03, n), 0.4, 0.995),
        rng.uniform(0.45, 0.99, n),
    )
    champion = _probs(rng, pred_c, top_c, c)
    candidate = _probs(rng, pred_a, top_a, c)
    ts = t0 + np.cumsum(rng.exponential(1.0 / sc.rate_per_s, size=n))
    lat_c = sc.champion_latency_ms * np.exp(rng.normal(0, 0.3, n))
    lat_a = sc.candidate_latency_ms * np.exp(rng.normal(0, 0.3, n))
    err_c = rng.random(n) < sc.champion_error_rate
    err_a = rng.random(n) < sc.candidate_error_rate
    age = np.round(rng.normal(40, 12, n) + sc.age_shift, 1)
    country = np.array(["de", "fr", "us", "br"], dtype=object)[
        rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    ]
    cols = {
        "slice": s,
        "y": y,
        "champion": champion,
        "candidate": candidate,
        "ts": ts,
        "lat_c": lat_c,
        "lat_a": lat_a,
        "err_c": err_c,
        "err_a": err_a,
        "age": age,
        "country": country,
    }
    batch = PairBatch.from_arrays(
        champion=champion,
        candidate=candidate,
        ts=ts,
        labels=y,
        slices={"platform": (names, s.astype(np.int64))},
        features={"age": age, "country": country},
        champion_latency=lat_c,
        candidate_latency=lat_a,
        champion_error=err_c,
        candidate_error=err_a,
    )
    return batch, cols


def stream(sc: Scenario, n: int, seed: int, chunk: int = 500) -> Iterator[PairBatch]:
    """``n`` pairs in chunks of ``chunk`` (the evaluation cadence), seeded."""
    rng = np.random.default_rng(seed)
    t = 0.0
    done = 0
    while done < n:
        k = min(chunk, n - done)
        batch, _ = generate(sc, k, rng, t)
        t = float(batch.ts[-1])
        done += k
        yield batch


def records(sc: Scenario, n: int, seed: int, *, t0: float = 1.7e9) -> list[PairRecord]:
    """``n`` labelled :class:`PairRecord` objects (replay files, proxy-shaped tests)."""
    rng = np.random.default_rng(seed)
    _, cols = generate(sc, n, rng, t0)
    names = list(sc.slice_shares)
    out = []
    for i in range(n):
        out.append(
            PairRecord(
                id=f"r-{seed}-{i}",
                ts=float(cols["ts"][i]),
                champion=ModelResult(
                    output=None if cols["err_c"][i] else np.round(cols["champion"][i], 4),
                    latency_ms=round(float(cols["lat_c"][i]), 3),
                    error="backend error" if cols["err_c"][i] else None,
                ),
                candidate=ModelResult(
                    output=None if cols["err_a"][i] else np.round(cols["candidate"][i], 4),
                    latency_ms=round(float(cols["lat_a"][i]), 3),
                    error="backend error" if cols["err_a"][i] else None,
                ),
                slices={"platform": names[int(cols["slice"][i])]},
                features={"age": float(cols["age"][i]), "country": str(cols["country"][i])},
                label=int(cols["y"][i]),
            )
        )
    return out
