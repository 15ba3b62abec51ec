"""Drift gates: the candidate's outputs against the champion's, inputs against a reference.

Both flag a shift only when an anytime-valid test rejects "the shift is within the limit":
significance is tested *at the limit*, not at zero, so a shift inside the limit is never
flagged, at any look, however large the sample (a point-estimate effect size compared with
its threshold at every look would be the fixed-threshold-repeated pattern). PSI is
reported as evidence beside the test.

Output divergence (blocking, a candidate failure). On the same requests, for each
coordinate j of the output distribution (the share of class j for classifiers, the CDF at
bin edge j for regression outputs; per output kind: each element's CDF and the norm's for
vector regression, the norm's and the cosine-to-the-champion's-mean-direction's CDF for
embeddings, the shares of the top champion strings and ``__other__`` for strings, each
label's positive share for multi-label; docs/gates.md, "Output kinds") the paired difference
``d_j = 1[cand in j] - 1[champ in j]`` lies in {-1, 0, 1}; its mean is the difference of
the two marginal shares. FAIL: the betting e-process rejects ``mean_j <= ks`` or
``mean_j >= -ks`` for some coordinate at level ``alpha / (2m)`` (Bonferroni over
coordinates and sides). PASS: every coordinate's difference is confidently inside
``(-ks, ks)`` (an equivalence test; intersection-union, so each side at ``alpha_pass``).

Input drift (a warning on the evidence: both models see the same inputs). Per feature,
coordinates are the reference-quantile CDF points (numeric) or category shares
(categorical). The reference sample is fixed: Clopper-Pearson intervals at
``alpha_ref / m`` cover all its coordinates; the current sample grows: beta-binomial
confidence sequences at ``alpha_cur / (2m)`` cover all of its coordinates at every look.
Flagged when, on some coordinate, the live CS lies entirely beyond the reference interval
widened by ``ks``: under "every coordinate moved by at most ks" both intervals cover their
true values, so this happens with probability at most ``alpha_ref + alpha_cur``,
uniformly over time. PSI and the KS distance are evidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy.special import betaincinv, chdtrc

from gates.base import Gate, status_of
from gates.batch import FloatArray, PairBatch, as_batch, batch_kind
from gates.cells import OTHER
from gates.kinds import multilabel_decisions, softmax
from gates.records import PairRecord
from gates.result import AGGREGATE, GateResult, Method, Status, fmt
from gates.stats import (
    chi2_from_counts,
    ks_from_counts,
    log_threshold,
    psi,
    rate_log_e,
    ternary_log_e,
)

OUTPUT_METHOD = Method(
    "paired share difference, betting e-process at the limit",
    "per-coordinate paired difference of the two output distributions tested against "
    "+/- ks (not zero), Bonferroni over coordinates, Ville's inequality; PSI as evidence",
)
INPUT_METHOD = Method(
    "reference CI + anytime CS at the limit",
    "Clopper-Pearson on the fixed reference widened by ks, beta-binomial confidence "
    "sequence on the live sample, Bonferroni over coordinates and features; PSI / KS as "
    "evidence",
)


def _edges_from(values: FloatArray, bins: int) -> FloatArray:
    """Quantile bin edges of a reference; every distinct value its own bin when few."""
    uniq = np.unique(values)
    if len(uniq) <= 1:
        return uniq.astype(np.float64)
    if len(uniq) <= bins:
        return uniq[:-1].astype(np.float64)
    return np.unique(np.quantile(values, np.arange(1, bins) / bins))


def _hist(values: FloatArray, edges: FloatArray) -> FloatArray:
    """Counts in ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    idx = np.searchsorted(edges, values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


# =========================================================================== output


class _Channel:
    """One group of output-drift coordinates: a distribution and how it is binned.

    ``shares``: category counts (classes, strings over fixed top values + ``__other__``),
    one coordinate per category; ``labels``: independent 0/1 decisions (multi-label), one
    coordinate per label; ``cdf``: a one-dimensional value binned at fixed edges, one
    coordinate per edge (the CDF there).
    """

    def __init__(
        self,
        label: str,
        mode: str,
        size: int,
        edges: FloatArray | None = None,
        categories: list[str] | None = None,
    ) -> None:
        self.label, self.mode, self.size = label, mode, size
        self.edges, self.categories = edges, categories

    def state(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mode": self.mode,
            "size": self.size,
            "edges": None if self.edges is None else self.edges.tolist(),
            "categories": self.categories,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> _Channel:
        edges = s.get("edges")
        return cls(
            str(s["label"]),
            str(s["mode"]),
            int(s["size"]),
            None if edges is None else np.asarray(edges, dtype=np.float64),
            s.get("categories"),
        )

    def same(self, other: _Channel) -> bool:
        return self.state() == other.state()


#: kinds whose drift coordinates are class shares (the predicted class of each row)
_CLASS_KINDS = frozenset({"class_index", "probabilities", "logits"})
#: kinds whose bins come from a reference (the first ``reference_size`` champion outputs)
_CALIBRATED = frozenset({"scalar_regression", "vector_regression", "embedding", "string"})


def _rows(arr: FloatArray) -> FloatArray:
    return arr.reshape(arr.shape[0], -1)


def _cosine_to(rows: FloatArray, center: FloatArray) -> FloatArray:
    norms = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(center))
    out: FloatArray = (rows @ center) / np.where(norms > 0, norms, 1.0)
    return out


class OutputDriftGate(Gate):
    family = "drift.output"

    @property
    def enabled(self) -> bool:
        return self.settings.drift.output.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.drift.output.blocking

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.settings.drift.output
        self.n = 0.0
        self.kind: str | None = None  # fixed by the first batch with outputs
        # per channel, concatenated: champion, candidate and "both" counts
        self.counts: dict[str, FloatArray] = {}
        self.channels: list[_Channel] | None = None
        # scalar regression: configured bin edges (other kinds calibrate their bins)
        self.edges: FloatArray | None = (
            np.asarray(sorted(cfg.edges), dtype=np.float64) if cfg.edges else None
        )
        self.center: FloatArray | None = None  # embeddings: the champion's mean direction
        self.reference: list[Any] = []

    # ------------------------------------------------------------------ views per kind

    def _kind(self, batch: PairBatch) -> str | None:
        if self.kind is None:
            self.kind = batch_kind(batch, self.settings.kind, self.settings.kinds, self.task)
        return self.kind

    def _values(self, kind: str, rows: FloatArray) -> list[FloatArray]:
        """The 1-D values of each cdf channel for these output rows."""
        if kind == "scalar_regression":
            return [rows[:, 0]]
        if kind == "vector_regression":
            width = min(rows.shape[1], self.settings.drift.output.max_elements)
            return [rows[:, j] for j in range(width)] + [np.linalg.norm(rows, axis=1)]
        assert self.center is not None
        return [np.linalg.norm(rows, axis=1), _cosine_to(rows, self.center)]

    def _calibrate(self) -> None:
        """Fix the bins from the reference champion outputs (then not tested)."""
        cfg = self.settings.drift.output
        kind = self.kind
        if kind == "string":
            counts = Counter(str(v) for v in self.reference)
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            cats = [k for k, _ in top[: cfg.max_categories - 1]] + [OTHER]
            self.channels = [_Channel("output", "shares", len(cats), categories=cats)]
        elif kind == "scalar_regression":
            edges = _edges_from(np.asarray(self.reference, dtype=np.float64), cfg.bins)
            self.edges = edges
            self.channels = [_Channel("output", "cdf", len(edges) + 1, edges)]
        else:
            rows = np.asarray(self.reference, dtype=np.float64)
            if kind == "embedding":
                unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
                self.center = unit.mean(axis=0)
                labels = ["norm", "cosine to the champion's mean direction"]
            else:
                width = min(rows.shape[1], cfg.max_elements)
                labels = [f"element {j}" for j in range(width)] + ["norm"]
            self.channels = []
            for label, values in zip(labels, self._values(str(kind), rows), strict=True):
                edges = _edges_from(values, cfg.bins)
                self.channels.append(_Channel(label, "cdf", len(edges) + 1, edges))
        self.reference = []

    def _update(self, batch: PairBatch) -> None:
        if not batch.comparable.any():
            return
        kind = self._kind(batch)
        if kind is None:
            return
        mask = batch.comparable
        if kind == "string":
            if batch.champion_text is None or batch.candidate_text is None:
                return
            idx = np.flatnonzero(mask)
            tc = [batch.champion_text[i] or "" for i in idx]
            ta = [batch.candidate_text[i] or "" for i in idx]
            rc = ra = None
        else:
            if batch.champion is None or batch.candidate is None:
                return
            if batch.champion.shape[1:] != batch.candidate.shape[1:]:
                return  # contract faults: counted by the contract gate
            rc = _rows(np.nan_to_num(batch.champion[mask]))
            ra = _rows(np.nan_to_num(batch.candidate[mask]))
            tc = ta = []
        if kind in _CLASS_KINDS:
            pcb, pab = batch.probabilities("champion"), batch.probabilities("candidate")
            if kind == "logits" and rc is not None and ra is not None:
                pcb, pab = softmax(rc), softmax(ra)
            elif pcb is not None and pab is not None:
                pcb, pab = pcb[mask], pab[mask]
            if pcb is None or pab is None or pcb.shape != pab.shape:
                return
            c = pcb.shape[1]
            yc, ya = pcb.argmax(axis=1), pab.argmax(axis=1)
            new = [
                np.bincount(yc, minlength=c).astype(np.float64),
                np.bincount(ya, minlength=c).astype(np.float64),
                np.bincount(yc[yc == ya], minlength=c).astype(np.float64),
            ]
            rows = len(yc)
            if self.channels is None:
                self.channels = [_Channel("class", "shares", c)]
            elif self.channels[0].size != c:
                return  # a different class count than the rest of the stream
        elif kind == "multilabel":
            assert rc is not None and ra is not None
            dc, da = multilabel_decisions(rc), multilabel_decisions(ra)
            new = [
                dc.sum(axis=0).astype(np.float64),
                da.sum(axis=0).astype(np.float64),
                (dc & da).sum(axis=0).astype(np.float64),
            ]
            rows = dc.shape[0]
            if self.channels is None:
                self.channels = [_Channel("label", "labels", dc.shape[1])]
            elif self.channels[0].size != dc.shape[1]:
                return
        else:
            start = 0
            if self.channels is None and kind == "scalar_regression" and self.edges is not None:
                self.channels = [_Channel("output", "cdf", len(self.edges) + 1, self.edges)]
            if self.channels is None:
                take = self.settings.drift.output.reference_size - len(self.reference)
                if kind == "string":
                    self.reference.extend(tc[:take])
                else:
                    assert rc is not None
                    ref = rc[:take]
                    self.reference.extend(
                        ref[:, 0].tolist() if kind == "scalar_regression" else ref.tolist()
                    )
                start = max(take, 0)
                if len(self.reference) >= self.settings.drift.output.reference_size:
                    self._calibrate()
                if self.channels is None:
                    return
            if kind == "string":
                new, rows = self._string_counts(tc[start:], ta[start:])
            else:
                assert rc is not None and ra is not None
                new, rows = self._cdf_counts(kind, rc[start:], ra[start:])
            if rows == 0:
                return
        for k, v in zip(("champion", "candidate", "both"), new, strict=True):
            self.counts[k] = self.counts.get(k, 0.0) + v
        self.n += float(rows)

    def _string_counts(self, tc: list[str], ta: list[str]) -> tuple[list[FloatArray], int]:
        assert self.channels is not None
        cats = self.channels[0].categories or [OTHER]
        index = {c: i for i, c in enumerate(cats)}
        other = len(cats) - 1
        ic = np.array([index.get(t, other) for t in tc], dtype=np.int64)
        ia = np.array([index.get(t, other) for t in ta], dtype=np.int64)
        m = len(cats)
        new = [
            np.bincount(ic, minlength=m).astype(np.float64),
            np.bincount(ia, minlength=m).astype(np.float64),
            np.bincount(ic[ic == ia], minlength=m).astype(np.float64),
        ]
        return new, len(ic)

    def _cdf_counts(
        self, kind: str, rc: FloatArray, ra: FloatArray
    ) -> tuple[list[FloatArray], int]:
        assert self.channels is not None
        parts: list[list[FloatArray]] = [[], [], []]
        for ch, vc, va in zip(
            self.channels, self._values(kind, rc), self._values(kind, ra), strict=True
        ):
            assert ch.edges is not None
            parts[0].append(_hist(vc, ch.edges))
            parts[1].append(_hist(va, ch.edges))
            parts[2].append(_hist(np.maximum(vc, va), ch.edges))
        return [np.concatenate(p) for p in parts], rc.shape[0]

    # ------------------------------------------------------------------ results

    def _coordinates(self) -> tuple[FloatArray, FloatArray, list[str], list[int]]:
        """Per coordinate: paired sum, number of discordant rows, label, channel index."""
        assert self.channels is not None
        ch, ca, both = self.counts["champion"], self.counts["candidate"], self.counts["both"]
        s1s, s2s, labels, owner = [], [], [], []
        pos = 0
        for i, c in enumerate(self.channels):
            a, b, o = ch[pos : pos + c.size], ca[pos : pos + c.size], both[pos : pos + c.size]
            pos += c.size
            if c.mode == "cdf":
                a, b, o = np.cumsum(a)[:-1], np.cumsum(b)[:-1], np.cumsum(o)[:-1]
                assert c.edges is not None
                name = "output" if c.label == "output" else c.label
                names = [f"P({name} <= {fmt(e)})" for e in c.edges]
            elif c.mode == "labels":
                names = [f"P(label {j} decided)" for j in range(c.size)]
            elif c.categories is not None:
                names = [f"P(output = {cat!r})" for cat in c.categories]
            else:
                names = [f"class {j}" for j in range(c.size)]
            s1s.append(b - a)
            s2s.append(b + a - 2.0 * o)
            labels += names
            owner += [i] * len(names)
        return np.concatenate(s1s), np.concatenate(s2s), labels, owner

    def _channel_counts(self, i: int) -> tuple[FloatArray, FloatArray]:
        assert self.channels is not None
        pos = sum(c.size for c in self.channels[:i])
        size = self.channels[i].size
        return (
            self.counts["champion"][pos : pos + size],
            self.counts["candidate"][pos : pos + size],
        )

    def _compute(self) -> list[GateResult]:
        cfg = self.settings.drift.output
        if not cfg.enabled:
            return []
        if not self.counts or self.n <= 0 or self.channels is None:
            waiting = (
                f"fixing the output bins from the first {cfg.reference_size} champion outputs "
                f"({len(self.reference)} so far)"
                if self.reference or (self.kind in _CALIBRATED and self.channels is None)
                else "no comparable pairs yet"
            )
            return [
                GateResult(
                    name="drift.output",
                    slice=AGGREGATE,
                    status=Status.INCONCLUSIVE,
                    statistic=None,
                    threshold=cfg.ks,
                    n=0,
                    confidence=0.0,
                    method=OUTPUT_METHOD,
                    reason=f"INCONCLUSIVE: output divergence is {waiting}",
                    blocking=cfg.blocking,
                    insufficient=True,
                )
            ]
        s1, s2, labels, owner = self._coordinates()
        m = len(s1)
        if m == 0:
            return []
        n = self.n
        # FAIL: some coordinate's share difference is confidently OUTSIDE (-ks, ks): the
        # e-process rejects "d_j <= ks" or "d_j >= -ks" (Bonferroni over 2m one-sided
        # tests). Never a point estimate: a shift inside the limit cannot fail, at any look.
        # PASS: every coordinate confidently inside (the same e-processes, mirror sides).
        thr_fail = log_threshold(self.alpha / (2 * m))
        thr_pass = log_threshold(self.settings.alpha_pass)
        s1s, s2s = np.concatenate([s1, s1]), np.concatenate([s2, s2])
        lim = np.full(m, cfg.ks)
        up = ternary_log_e(n, s1s, s2s, np.concatenate([lim, -lim]), "greater")
        down = ternary_log_e(n, s1s, s2s, np.concatenate([-lim, lim]), "less")
        outside = (up[:m] >= thr_fail) | (down[:m] >= thr_fail)
        within = (down[m:] >= thr_pass) & (up[m:] >= thr_pass)
        diff = s1 / n
        j = int(np.argmax(np.abs(diff)))
        enough = n >= cfg.min_samples
        failed = bool(outside.any())
        passed = bool(within.all()) and enough
        status = Status.FAIL if failed else Status.PASS if passed else Status.INCONCLUSIVE
        if status is Status.INCONCLUSIVE and not enough:
            word = f"INCONCLUSIVE (n={int(n)} < {cfg.min_samples} to PASS)"
        else:
            word = status.value
        if failed:
            j = int(np.argmax(np.where(outside, np.maximum(up[:m], down[:m]), -np.inf)))
        dist = float(abs(diff[j]))
        # PSI and chi-square: evidence, per distribution (the multi-label decisions are
        # not one distribution: none there); the largest PSI over the channels.
        dists = [i for i, c in enumerate(self.channels) if c.mode != "labels"]
        psis = {i: psi(*self._channel_counts(i)) for i in dists}
        index = max(psis.values()) if psis else None
        effect = dist >= cfg.ks or (cfg.psi is not None and index is not None and index >= cfg.psi)
        chi2_stat, dof = (
            chi2_from_counts(*self._channel_counts(owner[j])) if owner[j] in psis else (None, None)
        )
        reason = (
            f"{word}: candidate vs champion output distribution ({self.kind or self.task}) "
            f"on the same requests: largest share difference {fmt(diff[j])} at {labels[j]} "
            f"(threshold {fmt(cfg.ks)}), "
            f"{'confidently outside' if failed else 'not confidently outside'} +/-"
            f"{fmt(cfg.ks)} after Bonferroni over {m} coordinates (anytime-valid), "
            f"PSI {fmt(index)} (evidence; reference level {fmt(cfg.psi)}), n={int(n)}"
        )
        return [
            GateResult(
                name="drift.output",
                slice=AGGREGATE,
                status=status,
                statistic=dist,
                threshold=cfg.ks,
                n=int(n),
                confidence=1.0
                - (self.settings.alpha_pass if status is Status.PASS else self.alpha),
                method=OUTPUT_METHOD,
                reason=reason,
                blocking=cfg.blocking,
                insufficient=not enough,
                details={
                    "kind": self.kind,
                    "psi": index,
                    "psi_over_reference": bool(effect and cfg.psi is not None),
                    "significant": failed,
                    "coordinate": labels[j],
                    "coordinates": m,
                    "channels": [c.label for c in self.channels],
                    "chi2": chi2_stat,
                    "chi2_dof": dof,
                    "alpha": self.alpha,
                },
            )
        ]

    def _merge(self, other: OutputDriftGate) -> None:
        if self.kind is None:
            self.kind = other.kind
        elif other.kind not in (None, self.kind):
            raise ValueError(f"drift.output: cannot merge kind {other.kind} into {self.kind}")
        if self.channels is None and other.channels is not None:
            if self.reference:
                raise ValueError("drift.output: cannot merge a calibrating state")
            self.channels = [_Channel.from_state(c.state()) for c in other.channels]
            self.edges = None if other.edges is None else other.edges.copy()
            self.center = None if other.center is None else other.center.copy()
        elif other.channels is not None:
            assert self.channels is not None
            if len(self.channels) != len(other.channels) or not all(
                a.same(b) for a, b in zip(self.channels, other.channels, strict=True)
            ):
                raise ValueError(
                    "drift.output: cannot merge states with different bins or class counts"
                )
        elif other.reference:
            if self.channels is not None:
                raise ValueError("drift.output: cannot merge a calibrating state")
            self.reference.extend(other.reference)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0.0) + v
        self.n += other.n

    def _state(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "kind": self.kind,
            "counts": {k: v.tolist() for k, v in self.counts.items()},
            "channels": None if self.channels is None else [c.state() for c in self.channels],
            "edges": None if self.edges is None else self.edges.tolist(),
            "center": None if self.center is None else self.center.tolist(),
            "reference": list(self.reference),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.n = float(state.get("n", 0.0))
        self.kind = state.get("kind")
        self.counts = {k: np.asarray(v, dtype=float) for k, v in state.get("counts", {}).items()}
        edges = state.get("edges")
        self.edges = None if edges is None else np.asarray(edges, dtype=np.float64)
        center = state.get("center")
        self.center = None if center is None else np.asarray(center, dtype=np.float64)
        self.reference = list(state.get("reference", []))
        channels = state.get("channels")
        if channels is not None:
            self.channels = [_Channel.from_state(c) for c in channels]
        elif self.counts:  # a state from before kinds: one class or one regression channel
            size = len(self.counts["champion"])
            if self.edges is not None:
                self.channels = [_Channel("output", "cdf", size, self.edges)]
            else:
                self.channels = [_Channel("class", "shares", size)]
        else:  # nothing counted yet: the next batch sets the channels (edges kept)
            self.channels = None


# ============================================================================ input

FeatureKind = Literal["numeric", "categorical"]


class _Feature:
    """One frozen feature: its bins (numeric edges or categories) and both histograms."""

    def __init__(
        self,
        kind: FeatureKind,
        edges: FloatArray | None,
        categories: list[str] | None,
        ref: FloatArray,
    ) -> None:
        self.kind = kind
        self.edges = edges
        self.categories = categories
        self.ref = ref
        self.cur = np.zeros_like(ref)
        self.missing = 0.0
        # Clopper-Pearson intervals of the (fixed) reference, by level: computed once
        self.ref_ci: dict[float, tuple[FloatArray, FloatArray]] = {}

    def histogram(self, numeric: FloatArray, cat: np.ndarray | None) -> tuple[FloatArray, int]:
        if self.kind == "numeric":
            assert self.edges is not None
            ok = np.isfinite(numeric)
            return _hist(numeric[ok], self.edges), int((~ok).sum())
        assert self.categories is not None
        values = (
            cat
            if cat is not None
            else np.array(
                [None if not np.isfinite(v) else _num_str(v) for v in numeric], dtype=object
            )
        )
        present = values[values != None]  # noqa: E711 - elementwise on an object array
        if len(present) == 0:
            return np.zeros(len(self.categories)), len(values)
        # unique values in C, then a handful of dictionary lookups
        uniq, inverse = np.unique(present.astype(str), return_inverse=True)
        index = {c: i for i, c in enumerate(self.categories)}
        other = index.get(OTHER, len(self.categories) - 1)
        lookup = np.array([index.get(str(u), other) for u in uniq], dtype=np.int64)
        counts = np.bincount(lookup[inverse], minlength=len(self.categories)).astype(np.float64)
        return counts, len(values) - len(present)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "edges": None if self.edges is None else self.edges.tolist(),
            "categories": self.categories,
            "ref": self.ref.tolist(),
            "cur": self.cur.tolist(),
            "missing": self.missing,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> _Feature:
        f = cls(
            s["kind"],
            None if s.get("edges") is None else np.asarray(s["edges"], dtype=np.float64),
            s.get("categories"),
            np.asarray(s["ref"], dtype=np.float64),
        )
        f.cur = np.asarray(s["cur"], dtype=np.float64)
        f.missing = float(s.get("missing", 0.0))
        return f


def _num_str(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class InputDriftGate(Gate):
    """Input features against a reference; FAIL here is a warning (never blocking)."""

    family = "drift.input"

    @property
    def enabled(self) -> bool:
        return self.settings.drift.input.enabled

    @property
    def blocking(self) -> bool:
        return False

    @property
    def applicable(self) -> bool:
        return False  # no features, no input drift: nothing to wait for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features: dict[str, _Feature] = {}
        self.frozen = False
        self.buffer: dict[str, list[Any]] = {}
        self.buffered = 0
        self.source: str = self.settings.drift.input.reference

    # ------------------------------------------------------------------ reference

    def set_reference(self, data: PairBatch | Sequence[PairRecord], source: str = "file") -> None:
        """Freeze the reference from these records (a reference file). A deliberate act:
        refused once live data has been counted against another reference."""
        if self.frozen and any(f.cur.sum() > 0 for f in self.features.values()):
            raise ValueError("drift.input: the reference is already in use; not re-baselined")
        batch = as_batch(data)
        self.buffer, self.buffered = {}, 0
        self._collect(batch, batch.n)
        self.source = source
        self._freeze()
        self._version += 1

    def _collect(self, batch: PairBatch, rows: int) -> None:
        cfg = self.settings.drift.input
        names = cfg.features if cfg.features is not None else batch.feature_names()
        for name in names:
            if name not in self.buffer:
                if cfg.features is None and len(self.buffer) >= cfg.max_features:
                    continue
                self.buffer[name] = [None] * self.buffered
            self.buffer[name].extend(batch.feature_values(name, rows))
        for values in self.buffer.values():
            if len(values) < self.buffered + rows:
                values.extend([None] * (self.buffered + rows - len(values)))
        self.buffered += rows

    def _freeze(self) -> None:
        cfg = self.settings.drift.input
        self.features = {}
        for name, values in self.buffer.items():
            present = [v for v in values if v is not None and not isinstance(v, bool)]
            if len(present) < 2:
                continue
            if any(isinstance(v, str) for v in present):
                counts = Counter(v if isinstance(v, str) else _num_str(v) for v in present)
                top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                cats = [k for k, _ in top[: cfg.max_categories - 1]]
                cats.append(OTHER)
                ref = np.array(
                    [counts[c] for c in cats[:-1]]
                    + [sum(v for k, v in counts.items() if k not in set(cats[:-1]))],
                    dtype=np.float64,
                )
                self.features[name] = _Feature("categorical", None, cats, ref)
            else:
                arr = np.asarray(present, dtype=np.float64)
                arr = arr[np.isfinite(arr)]
                if len(arr) < 2:
                    continue
                edges = _edges_from(arr, cfg.bins)
                self.features[name] = _Feature("numeric", edges, None, _hist(arr, edges))
        self.buffer, self.frozen = {}, True

    # ------------------------------------------------------------------ update

    def _update(self, batch: PairBatch) -> None:
        cfg = self.settings.drift.input
        if not cfg.enabled:
            return
        start = 0
        if not self.frozen:
            if self.source != "first_n":
                return  # waits for set_reference(); nothing is counted against nothing
            start = min(cfg.reference_size - self.buffered, batch.n)
            self._collect(batch, start)
            if self.buffered >= cfg.reference_size:
                self._freeze()
            if not self.frozen or start >= batch.n:
                return
        rest = batch if start == 0 else batch.take(start)
        for name, feat in self.features.items():
            numeric, cat = rest.feature(name)
            counts, missing = feat.histogram(numeric, cat)
            if len(counts) == len(feat.cur):
                feat.cur += counts
            feat.missing += missing

    # ------------------------------------------------------------------ results

    def _compute(self) -> list[GateResult]:
        cfg = self.settings.drift.input
        if not cfg.enabled:
            return []
        if not self.frozen:
            state = (
                f"collecting the reference ({self.buffered}/{cfg.reference_size} pairs)"
                if self.source == "first_n"
                else "waiting for the reference file"
            )
            return [
                GateResult(
                    name="drift.input",
                    slice=AGGREGATE,
                    status=Status.INCONCLUSIVE,
                    statistic=None,
                    threshold=cfg.psi,
                    n=0,
                    confidence=0.0,
                    method=INPUT_METHOD,
                    reason=f"INCONCLUSIVE: input drift is {state}",
                    blocking=False,
                    insufficient=True,
                )
            ]
        n_alloc = len(cfg.features) if cfg.features is not None else cfg.max_features
        a_feat = cfg.alpha / max(n_alloc, 1)
        feats = list(self.features.items())
        if not feats:
            return []
        # Every coordinate of every feature in one pair of vectorised calls.
        coords = [self._coords(name, f, a_feat) for name, f in feats]
        n_cur = np.concatenate([np.full(len(c["k_cur"]), c["n_cur"]) for c in coords])
        k_cur = np.concatenate([c["k_cur"] for c in coords])
        ref_lo = np.concatenate([c["ref_lo"] for c in coords])
        ref_hi = np.concatenate([c["ref_hi"] for c in coords])
        thr = np.concatenate([np.full(len(c["k_cur"]), c["thr"]) for c in coords])
        delta = cfg.ks if cfg.ks is not None else 0.1
        eps = 1e-12
        size = len(k_cur)

        def rejects(theta: FloatArray, side: Literal["greater", "less"]) -> np.ndarray:
            inside = (theta > eps) & (theta < 1 - eps)
            t = np.clip(theta, eps, 1 - eps)
            le = rate_log_e(np.tile(n_cur, 2), np.tile(k_cur, 2), t, side)
            return np.asarray(inside & (le >= np.tile(thr, 2)))

        # The live CS (a_coord/2 per side) lies above ref_hi iff the "greater" test rejects
        # theta = ref_hi (rejection regions are intervals), so no bisection is needed.
        # PASS: every live coordinate confidently within delta of the reference interval.
        # FAIL (a warning): the live CS lies entirely beyond the reference interval widened
        # by delta on some coordinate, i.e. "the shift is within delta" is rejected; a
        # shift inside the limit cannot be flagged however large the sample.
        g = rejects(np.concatenate([ref_hi + delta, ref_hi - delta]), "greater")
        lo = rejects(np.concatenate([ref_lo - delta, ref_lo + delta]), "less")
        disjoint = g[:size] | lo[:size]
        within = ((ref_lo + delta >= 1) | lo[size:]) & ((ref_hi - delta <= 0) | g[size:])
        out = []
        start = 0
        for (name, f), c in zip(feats, coords, strict=True):
            part = slice(start, start + len(c["k_cur"]))
            start += len(c["k_cur"])
            out.append(
                self._feature_result(
                    name, f, a_feat, c, bool(disjoint[part].any()), bool(within[part].all())
                )
            )
        return out

    def _coords(self, name: str, f: _Feature, a_feat: float) -> dict[str, Any]:
        if f.kind == "numeric":
            k_ref, k_cur = np.cumsum(f.ref)[:-1], np.cumsum(f.cur)[:-1]
        else:
            k_ref, k_cur = f.ref, f.cur
        m = max(len(k_ref), 1)
        n_ref = float(f.ref.sum())
        a_coord = a_feat / 2.0 / m  # half the feature's budget for each sample
        cached = f.ref_ci.get(a_coord)
        if cached is None:
            # Clopper-Pearson, two-sided at a_coord, fixed reference: computed once.
            with np.errstate(invalid="ignore"):
                lo = np.where(k_ref > 0, betaincinv(k_ref, n_ref - k_ref + 1, a_coord / 2), 0.0)
                hi = np.where(
                    k_ref < n_ref, betaincinv(k_ref + 1, n_ref - k_ref, 1 - a_coord / 2), 1.0
                )
            cached = f.ref_ci[a_coord] = (lo, hi)
        return {
            "k_ref": k_ref,
            "k_cur": k_cur,
            "n_ref": n_ref,
            "n_cur": float(f.cur.sum()),
            "ref_lo": cached[0],
            "ref_hi": cached[1],
            "thr": float(log_threshold(a_coord / 2)),
        }

    def _feature_result(
        self,
        name: str,
        f: _Feature,
        a_feat: float,
        c: dict[str, Any],
        significant: bool,
        within: bool,
    ) -> GateResult:
        cfg = self.settings.drift.input
        n_ref, n_cur = c["n_ref"], c["n_cur"]
        k_ref, k_cur = c["k_ref"], c["k_cur"]
        if f.kind == "numeric":
            assert f.edges is not None
            labels = [f"P({name} <= {fmt(e)})" for e in f.edges]
        else:
            assert f.categories is not None
            labels = [f"P({name} = {cat})" for cat in f.categories]
        significant = significant and n_cur > 0
        index = psi(f.ref, f.cur)
        ks = ks_from_counts(f.ref, f.cur) if f.kind == "numeric" else None
        enough = n_cur > 0
        status = status_of(significant, within, enough)
        p_ref = k_ref / max(n_ref, 1.0)
        p_cur = k_cur / max(n_cur, 1.0)
        j = int(np.argmax(np.abs(p_cur - p_ref))) if len(k_ref) else 0
        chi2_stat, dof = chi2_from_counts(f.ref, f.cur)
        p_fixed = float(chdtrc(dof, chi2_stat)) if dof > 0 else 1.0
        word = "WARNING" if status is Status.FAIL else status.value
        reason = (
            f"{word}: input feature {name!r} against the {self.source} reference: "
            f"PSI {fmt(index)} (threshold {fmt(cfg.psi)})"
            + (f", KS {fmt(ks)} (threshold {fmt(cfg.ks)})" if ks is not None else "")
            + f", largest shift at {labels[j]}: {fmt(p_ref[j])} -> {fmt(p_cur[j])}, "
            f"{'confidently beyond' if significant else 'not confidently beyond'} the "
            f"reference +/-{fmt(cfg.ks if cfg.ks is not None else 0.1)} after Bonferroni, "
            f"n={int(n_cur)} vs reference {int(n_ref)}; a warning, both models see it"
        )
        return GateResult(
            name=f"drift.input.{name}",
            slice=AGGREGATE,
            status=status,
            statistic=index,
            threshold=cfg.psi,
            n=int(n_cur),
            confidence=1.0 - a_feat,
            method=INPUT_METHOD,
            reason=reason,
            blocking=False,
            insufficient=not enough,
            details={
                "kind": f.kind,
                "ks": ks,
                "significant": significant,
                "chi2": chi2_stat,
                "chi2_dof": dof,
                "p_fixed_sample": p_fixed,
                "reference_n": int(n_ref),
                "missing": int(f.missing),
            },
        )

    # ------------------------------------------------------------------ state

    def _merge(self, other: InputDriftGate) -> None:
        if not other.frozen:
            if self.frozen:
                raise ValueError("drift.input: cannot merge a state still collecting its reference")
            for name, values in other.buffer.items():
                self.buffer.setdefault(name, [None] * self.buffered).extend(values)
            self.buffered += other.buffered
            for values in self.buffer.values():
                values.extend([None] * (self.buffered - len(values)))
            return
        if not self.frozen:
            if self.buffered:
                raise ValueError("drift.input: cannot merge into a state collecting a reference")
            self.features = {k: _Feature.from_state(v.state()) for k, v in other.features.items()}
            self.frozen, self.source = True, other.source
            return
        for name, f in other.features.items():
            mine = self.features.get(name)
            if mine is None or not np.array_equal(mine.ref, f.ref):
                raise ValueError(f"drift.input: feature {name!r} has another reference")
            mine.cur += f.cur
            mine.missing += f.missing

    def _state(self) -> dict[str, Any]:
        return {
            "frozen": self.frozen,
            "source": self.source,
            "buffered": self.buffered,
            "buffer": {k: list(v) for k, v in self.buffer.items()},
            "features": {k: v.state() for k, v in self.features.items()},
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))
        self.source = state.get("source", self.source)
        self.buffered = int(state.get("buffered", 0))
        self.buffer = {k: list(v) for k, v in state.get("buffer", {}).items()}
        self.features = {k: _Feature.from_state(v) for k, v in state.get("features", {}).items()}
