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
from gates.settings import GatesSettings


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


# ------------------------------------------------------------------------------------
# Vectorised streams of the paired accuracy check, decided with the engine's own budget
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceStreams:
    """Many streams of paired correctness differences ``d`` in {-1, 0, 1} with slices.

    ``keys`` maps a slice key to its value shares (a function of the pair's position in
    the stream when ``mix`` is set: shares move linearly from ``shares`` to ``mix``).
    ``acc`` gives (champion, candidate) accuracy per ``key=value`` cell name (default:
    ``base``); ``drift`` multiplies both accuracies' distance from 1 over the stream
    (both models degrading together). ``labelled`` thins the labelled pairs, ``delay``
    shifts every label that many pairs later. Correctness is drawn as in
    :func:`generate`: a shared uniform with probability ``agreement``.
    """

    keys: dict[str, dict[str, float]]
    acc: dict[str, tuple[float, float]] = field(default_factory=dict)
    base: tuple[float, float] = (0.9, 0.9)
    agreement: float = 0.7
    mix: dict[str, dict[str, float]] | None = None
    degrade: float = 0.0  # both accuracies fall by this much (absolute) over the stream
    labelled: float = 1.0
    delay: int = 0

    def draw(
        self, rng: np.random.Generator, streams: int, pairs: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Per key the value codes (streams x pairs), ``d``, and which pairs are labelled."""
        pos = np.linspace(0.0, 1.0, pairs)[None, :]
        codes: dict[str, np.ndarray] = {}
        acc_c = np.full((streams, pairs), self.base[0])
        acc_a = np.full((streams, pairs), self.base[1])
        for key, shares in self.keys.items():
            names = list(shares)
            p0 = np.array([shares[v] for v in names])
            p1 = p0 if self.mix is None else np.array([self.mix[key][v] for v in names])
            cum = (
                np.cumsum(p0 / p0.sum())[:, None] * (1 - pos)
                + np.cumsum(p1 / p1.sum())[:, None] * pos
            )  # (values, pairs)
            u = rng.random((streams, pairs))
            c = (u[:, None, :] > cum[None, :, :]).sum(axis=1)
            codes[key] = np.minimum(c, len(names) - 1)
            for j, v in enumerate(names):
                cell = f"{key}={v}"
                if cell in self.acc:
                    hit = codes[key] == j
                    acc_c = np.where(hit, self.acc[cell][0], acc_c)
                    acc_a = np.where(hit, self.acc[cell][1], acc_a)
        if self.degrade:
            acc_c = acc_c - self.degrade * pos
            acc_a = acc_a - self.degrade * pos
        u = rng.random((streams, pairs))
        w = np.where(rng.random((streams, pairs)) < self.agreement, u, rng.random((streams, pairs)))
        d = (w < acc_a).astype(np.float64) - (u < acc_c).astype(np.float64)
        lab = rng.random((streams, pairs)) < self.labelled
        return codes, d, lab

    def cell_names(self) -> list[str]:
        return [f"{k}={v}" for k, shares in self.keys.items() for v in shares]


def accuracy_check_alpha(settings: GatesSettings) -> float:
    """The budget the engine gives ``metric.accuracy`` (classification) before slices."""
    from gates.engine import family_budgets
    from gates.metric import check_alpha

    m = settings.metric
    names = ("accuracy", "recall", "high_confidence_error")
    active = [c for c in names if getattr(m, c).enabled]
    return check_alpha(settings, family_budgets(settings)["metric"], active, "accuracy")


def admission_alphas(
    settings: GatesSettings, check_alpha: float, first: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per slice cell and stream, the FAIL level the engine fixes when the cell appears.

    ``first[cell]`` is the pair index where the cell first has a labelled pair (inf:
    never); cells are ranked in that order (ties by name, as ``SliceCells.assign``)."""
    from gates.cells import cell_weight

    names = sorted(first)
    rows = np.stack([first[c] for c in names])  # cells x streams
    rank = np.argsort(np.argsort(rows, axis=0, kind="stable"), axis=0, kind="stable") + 1
    share = check_alpha * settings.slices.alpha_share
    out = {}
    for i, c in enumerate(names):
        w = np.array([cell_weight(int(k), settings.slices.spread) for k in rank[i]])
        out[c] = np.where(np.isfinite(rows[i]), share * w, 0.0)
    return out


def first_looks(hit: np.ndarray, looks: np.ndarray) -> np.ndarray:
    """Pairs (1-based) at the first look where ``hit`` holds, per stream (inf: never)."""
    any_ = hit.any(axis=1)
    return np.where(any_, (looks[np.argmax(hit, axis=1)] + 1).astype(float), np.inf)


def run_accuracy_streams(
    sc: SliceStreams,
    settings: GatesSettings,
    *,
    streams: int,
    pairs: int,
    every: int,
    seed: int,
    sliced: bool = True,
    want_pass: bool = False,
    chunk: int = 50,
) -> dict[str, np.ndarray]:
    """First look (in pairs) at which the engine's accuracy cells FAIL (any cell), and, with
    ``want_pass``, at which every required cell PASSes (the shadow stage's gate), per
    stream. The rules are the engine's: FAIL at any n with the admission-order budget,
    PASS from ``min_samples`` with slices above ``require_share`` at the widened margin.
    """
    from gates.base import decide
    from gates.sliced import widened_pass_limit
    from gates.stats import ternary_log_e

    rng = np.random.default_rng(seed)
    m = settings.metric.accuracy.margin
    sl = settings.slices
    a_check = accuracy_check_alpha(settings)
    a_agg = a_check * (1.0 - sl.alpha_share) if sliced else a_check
    a_pass = settings.alpha_pass
    looks = np.arange(every, pairs + 1, every) - 1
    fail_at = np.full(streams, np.inf)
    pass_at = np.full(streams, np.inf)
    failed_cells: list[str] = ["" for _ in range(streams)]
    for part in np.array_split(np.arange(streams), max(1, streams // chunk)):
        r = len(part)
        codes, d, lab = sc.draw(rng, r, pairs)
        d = d * lab
        w = lab.astype(np.float64)
        if sc.delay:
            # a label arrives ``delay`` pairs after its pair: shift the labelled stream
            pad = np.zeros((r, sc.delay))
            d = np.concatenate([pad, d[:, : pairs - sc.delay]], axis=1)
            w = np.concatenate([pad, w[:, : pairs - sc.delay]], axis=1)
            codes = {
                k: np.concatenate(
                    [np.zeros((r, sc.delay), dtype=v.dtype), v[:, : pairs - sc.delay]], axis=1
                )
                for k, v in codes.items()
            }
        cells: dict[str, np.ndarray] = {"*": np.ones_like(d, dtype=bool)}
        if sliced:
            for key, shares in sc.keys.items():
                for j, v in enumerate(shares):
                    cells[f"{key}={v}"] = codes[key] == j
        first = {
            c: np.where((mask & (w > 0)).any(axis=1), np.argmax(mask & (w > 0), axis=1), np.inf)
            for c, mask in cells.items()
            if c != "*"
        }
        alphas = admission_alphas(settings, a_check, first) if sliced else {}
        fail = np.zeros((r, len(looks)), dtype=bool)
        which = np.full((r, len(looks)), "", dtype=object)
        ok_pass = np.ones((r, len(looks)), dtype=bool)
        total = np.cumsum(w, axis=1)[:, looks]
        for c, mask in cells.items():
            mw = mask * w
            n = np.cumsum(mw, axis=1)[:, looks]
            s1 = np.cumsum(d * mask, axis=1)[:, looks]
            s2 = np.cumsum(d * d * mask, axis=1)[:, looks]
            alpha = np.full(r, a_agg) if c == "*" else alphas[c]
            dec = decide(
                "ternary",
                n.ravel(),
                s1.ravel(),
                s2.ravel(),
                -m,
                np.repeat(alpha, len(looks)),
                a_pass,
                "low",
            )
            f = dec.fail.reshape(n.shape)
            which[f & ~fail] = c
            fail |= f
            if not want_pass:
                continue
            if c == "*":
                ok_pass &= dec.passed.reshape(n.shape) & (n >= settings.metric.min_samples)
                continue
            share = np.where(total > 0, n / np.maximum(total, 1), 0.0)
            required = share >= sl.require_share
            floor = n >= max(settings.metric.min_samples, sl.min_samples)
            if sl.pass_margin == "sqrt_share" and m > 0:
                # only where it can still matter (every earlier cell passes): the share
                # bound's bisection is the costly part
                todo = ok_pass & required & floor
                passed = np.zeros(n.shape, dtype=bool)
                if todo.any():
                    limit, lvl = widened_pass_limit(-m, n[todo], total[todo], a_pass)
                    le = ternary_log_e(n[todo], s1[todo], s2[todo], limit, "greater")
                    passed[todo] = le >= -np.log(lvl)
            else:
                passed = dec.passed.reshape(n.shape)
            passed &= floor
            ok_pass &= passed | ~required
        fail_at[part] = first_looks(fail, looks)
        for i, s in enumerate(part):
            if fail[i].any():
                failed_cells[s] = str(which[i, int(np.argmax(fail[i]))])
        if want_pass:
            # promotion needs no FAIL before it: a stream that failed first never leaves
            p_at = first_looks(ok_pass, looks)
            pass_at[part] = np.where(p_at < fail_at[part], p_at, np.inf)
    return {"fail_at": fail_at, "pass_at": pass_at, "failed_cell": np.array(failed_cells)}
