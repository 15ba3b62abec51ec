"""A batch of paired records as numpy arrays: built once, read by every gate.

Gates never loop over records; they read the arrays here. Rows whose outputs cannot be
compared (an error, a missing output, a shape that differs from the batch's) are masked
out of the output-based gates and still count for the error gate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gates.records import PairRecord

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Errors that mean "no observation" rather than "the model failed": a record written
# without one side (``ModelResult.from_dict(None)``) or a shadow call that never ran.
NOT_OBSERVED = frozenset({"missing", "dropped", "not_mirrored", "skipped"})


def _is_timeout(err: str) -> bool:
    e = err.lower()
    return "timeout" in e or "timed out" in e or "deadline" in e


def _stack(outputs: list[np.ndarray | None], n: int) -> tuple[FloatArray | None, BoolArray]:
    """Stack per-row outputs of the batch's most common shape; other rows are masked."""
    shapes = Counter(o.shape for o in outputs if o is not None)
    ok = np.zeros(n, dtype=bool)
    if not shapes:
        return None, ok
    shape = shapes.most_common(1)[0][0]
    rows = [i for i, o in enumerate(outputs) if o is not None and o.shape == shape]
    arr = np.full((n, *shape), np.nan, dtype=np.float64)
    if rows:
        arr[rows] = np.stack([o for i in rows if (o := outputs[i]) is not None])
        ok[rows] = True
    ok &= np.isfinite(arr.reshape(n, -1)).all(axis=1)
    return arr, ok


@dataclass
class PairBatch:
    """Column view of ``records``; ``n`` rows, arrays aligned with the record order."""

    records: Sequence[PairRecord]
    n: int
    ts: FloatArray
    champion: FloatArray | None
    candidate: FloatArray | None
    comparable: BoolArray  # both outputs present, finite, same shape
    champion_error: BoolArray
    candidate_error: BoolArray
    champion_timeout: BoolArray
    candidate_timeout: BoolArray
    observed: BoolArray  # both sides were called (errors included)
    champion_latency: FloatArray
    candidate_latency: FloatArray
    slices: dict[str, tuple[list[str], IntArray]]
    # Column form (simulations build batches without records): labels and features.
    labels: list[Any] | NDArray[Any] | None = None
    feature_columns: dict[str, NDArray[Any]] | None = None
    _features: dict[str, tuple[FloatArray, NDArray[Any] | None]] = field(default_factory=dict)
    _derived: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Sequence[PairRecord]) -> PairBatch:
        n = len(records)
        ch_out = [r.champion.output if r.champion.error is None else None for r in records]
        ca_out = [r.candidate.output if r.candidate.error is None else None for r in records]
        champion, ch_ok = _stack(ch_out, n)
        candidate, ca_ok = _stack(ca_out, n)
        comparable = ch_ok & ca_ok
        if champion is not None and candidate is not None:
            if champion.shape[1:] != candidate.shape[1:]:
                comparable[:] = False
        ch_err_s = [r.champion.error for r in records]
        ca_err_s = [r.candidate.error for r in records]
        pairs = zip(ch_err_s, ca_err_s, strict=True)
        observed = np.fromiter(
            (a not in NOT_OBSERVED and b not in NOT_OBSERVED for a, b in pairs),
            dtype=bool,
            count=n,
        )
        ch_err = np.fromiter((e is not None for e in ch_err_s), dtype=bool, count=n)
        ca_err = np.fromiter((e is not None for e in ca_err_s), dtype=bool, count=n)
        ch_to = np.fromiter((e is not None and _is_timeout(e) for e in ch_err_s), bool, count=n)
        ca_to = np.fromiter((e is not None and _is_timeout(e) for e in ca_err_s), bool, count=n)

        def lat(values: list[float | None]) -> FloatArray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        slices: dict[str, tuple[list[str], IntArray]] = {}
        keys: dict[str, None] = {}
        for r in records:
            if r.slices:
                keys.update(dict.fromkeys(r.slices))
        for key in keys:
            mapping: dict[str, int] = {}
            codes = np.fromiter(
                (
                    -1 if (v := r.slices.get(key)) is None else mapping.setdefault(v, len(mapping))
                    for r in records
                ),
                dtype=np.int64,
                count=n,
            )
            slices[key] = (list(mapping), codes)
        return cls(
            records=records,
            n=n,
            ts=np.fromiter((r.ts for r in records), dtype=np.float64, count=n),
            champion=champion,
            candidate=candidate,
            comparable=comparable,
            champion_error=ch_err,
            candidate_error=ca_err,
            champion_timeout=ch_to,
            candidate_timeout=ca_to,
            observed=observed,
            champion_latency=lat([r.champion.latency_ms for r in records]),
            candidate_latency=lat([r.candidate.latency_ms for r in records]),
            slices=slices,
        )

    # ----------------------------------------------------------------- derived columns

    @classmethod
    def from_arrays(
        cls,
        *,
        champion: FloatArray,
        candidate: FloatArray,
        ts: FloatArray,
        labels: list[Any] | NDArray[Any] | None = None,
        slices: dict[str, tuple[list[str], IntArray]] | None = None,
        features: dict[str, NDArray[Any]] | None = None,
        champion_latency: FloatArray | None = None,
        candidate_latency: FloatArray | None = None,
        champion_error: BoolArray | None = None,
        candidate_error: BoolArray | None = None,
    ) -> PairBatch:
        """Column-built batch (simulations, benchmarks): same arrays as from records."""
        n = len(ts)
        no = np.zeros(n, dtype=bool)
        ch_err = no if champion_error is None else champion_error
        ca_err = no if candidate_error is None else candidate_error
        ok = np.isfinite(champion.reshape(n, -1)).all(axis=1) & np.isfinite(
            candidate.reshape(n, -1)
        ).all(axis=1)
        nan = np.full(n, np.nan)
        return cls(
            records=(),
            n=n,
            ts=ts,
            champion=champion,
            candidate=candidate,
            comparable=ok & ~ch_err & ~ca_err,
            champion_error=ch_err,
            candidate_error=ca_err,
            champion_timeout=no,
            candidate_timeout=no,
            observed=np.ones(n, dtype=bool),
            champion_latency=nan if champion_latency is None else champion_latency,
            candidate_latency=nan if candidate_latency is None else candidate_latency,
            slices=slices or {},
            labels=labels,
            feature_columns=features,
        )

    def take(self, start: int) -> PairBatch:
        """Rows ``start:`` as a new batch."""
        if self.feature_columns is None and self.labels is None:
            return PairBatch.from_records(self.records[start:])

        def cut(a: Any) -> Any:
            return None if a is None else a[start:]

        return PairBatch(
            records=self.records[start:],
            n=self.n - start,
            ts=self.ts[start:],
            champion=cut(self.champion),
            candidate=cut(self.candidate),
            comparable=self.comparable[start:],
            champion_error=self.champion_error[start:],
            candidate_error=self.candidate_error[start:],
            champion_timeout=self.champion_timeout[start:],
            candidate_timeout=self.candidate_timeout[start:],
            observed=self.observed[start:],
            champion_latency=self.champion_latency[start:],
            candidate_latency=self.candidate_latency[start:],
            slices={k: (v, c[start:]) for k, (v, c) in self.slices.items()},
            labels=cut(self.labels),
            feature_columns=None
            if self.feature_columns is None
            else {k: v[start:] for k, v in self.feature_columns.items()},
        )

    def feature_values(self, name: str, rows: int) -> list[Any]:
        """Raw values of one feature for the first ``rows`` rows (None where missing)."""
        if self.feature_columns is not None:
            col = self.feature_columns.get(name)
            return [None] * rows if col is None else col[:rows].tolist()
        return [r.features.get(name) for r in self.records[:rows]]

    def feature_names(self) -> list[str]:
        if self.feature_columns is not None:
            return list(self.feature_columns)
        names: dict[str, None] = {}
        for r in self.records:
            if r.features:
                names.update(dict.fromkeys(r.features))
        return list(names)

    def feature(self, name: str) -> tuple[FloatArray, NDArray[Any] | None]:
        """``(numeric, categorical)``: floats (NaN where missing or not a number) and, when
        any value is a string, an object array of strings (None where missing)."""
        cached = self._features.get(name)
        if cached is not None:
            return cached
        col = None if self.feature_columns is None else self.feature_columns.get(name)
        cat: NDArray[Any] | None = None
        if col is not None and col.dtype.kind in "iuf":
            numeric = col.astype(np.float64)
        else:
            raw = col.tolist() if col is not None else self.feature_values(name, self.n)
            # float() of an int/float is exact; strings and None become NaN here
            numeric = np.array(
                [v if type(v) is float else (float(v) if type(v) is int else np.nan) for v in raw],
                dtype=np.float64,
            )
            strings = [v for v in raw if type(v) is str]
            if strings:
                cat = np.array([None if v is None else str(v) for v in raw], dtype=object)
        self._features[name] = (numeric, cat)
        return numeric, cat

    def probabilities(self, role: str) -> FloatArray | None:
        """Class probabilities of one model (cached: several gates read them)."""
        key = f"probs:{role}"
        if key not in self._derived:
            arr = self.champion if role == "champion" else self.candidate
            self._derived[key] = None if arr is None else to_probabilities(np.nan_to_num(arr))
        return self._derived[key]

    def raw_labels(self) -> list[Any] | NDArray[Any]:
        if self.labels is not None:
            return self.labels
        return [r.label for r in self.records]


def as_batch(data: PairBatch | Sequence[PairRecord]) -> PairBatch:
    return data if isinstance(data, PairBatch) else PairBatch.from_records(data)


# ------------------------------------------------------------------ task-specific views


def output_kind(arr: FloatArray | None) -> str:
    """'scalar' for one number per row (or a 1-vector), 'vector' otherwise."""
    if arr is None:
        return "none"
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        return "scalar"
    return "vector"


def scalars(arr: FloatArray) -> FloatArray:
    return arr.reshape(arr.shape[0], -1)[:, 0] if arr.ndim > 1 else arr


def to_probabilities(arr: FloatArray) -> FloatArray:
    """Class probabilities per row: kept when they already are, else softmax / sigmoid.

    A scalar per row is P(class 1) of a binary classifier (a logit when outside [0, 1]).
    """
    if output_kind(arr) == "scalar":
        p = scalars(arr)
        inside = (p >= 0) & (p <= 1)
        with np.errstate(over="ignore"):
            p = np.where(inside, p, 1.0 / (1.0 + np.exp(-np.nan_to_num(p))))
        return np.stack([1.0 - p, p], axis=1)
    x = arr.reshape(arr.shape[0], -1)
    is_prob = (x >= -1e-9).all(axis=1) & (np.abs(x.sum(axis=1) - 1.0) <= 1e-3)
    if is_prob.all():
        return x
    z = np.nan_to_num(x) - np.nan_to_num(x).max(axis=1, keepdims=True)
    soft = np.exp(z)
    soft /= soft.sum(axis=1, keepdims=True)
    out: FloatArray = np.where(is_prob[:, None], x, soft)
    return out


def class_labels(raw: list[Any] | NDArray[Any], n_classes: int) -> IntArray:
    """Integer class per row; -1 where the label is missing or not a valid class index."""
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "iuf":
        arr = raw.astype(np.float64)
        good = np.isfinite(arr) & (arr == np.round(arr)) & (arr >= 0) & (arr < n_classes)
        return np.where(good, np.nan_to_num(arr), -1).astype(np.int64)
    out = np.full(len(raw), -1, dtype=np.int64)
    for i, v in enumerate(raw):
        if v is None or isinstance(v, bool | list | dict):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f.is_integer() and 0 <= f < n_classes:
            out[i] = int(f)
    return out


def numeric_labels(raw: list[Any] | NDArray[Any]) -> FloatArray:
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "iuf":
        f = raw.astype(np.float64)
        return np.where(np.isfinite(f), f, np.nan)
    out = np.full(len(raw), np.nan, dtype=np.float64)
    for i, v in enumerate(raw):
        if v is None or isinstance(v, bool | list | dict):
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            continue
    out[~np.isfinite(out)] = np.nan
    return out
