"""A batch of paired records as numpy arrays: built once, read by every gate.

Gates never loop over records; they read the arrays here. Rows whose outputs cannot be
compared (an error, a missing output, a shape that differs from the batch's) are masked
out of the output-based gates and still count for the error gate. A row whose candidate
output breaks the output contract (docs/gates.md: name, datatype family, per-row shape of
the champion's) is a candidate output fault: ``contract_fault`` is set, the row counts as a
candidate error, and the contract gate counts it; it is never silently skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gates.columns import PairColumns
from gates.kinds import configured_kind, datatype_family, infer_kind
from gates.records import ModelResult, PairRecord

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# Errors that mean "no observation" rather than "the model failed": a record written
# without one side (``ModelResult.from_dict(None)``) or a shadow call that never ran.
NOT_OBSERVED = frozenset({"missing", "dropped", "not_mirrored", "skipped"})
# Candidate errors that are a broken output contract rather than a failed call.
CONTRACT_ERRORS = frozenset({"missing_output", "shape_mismatch", "non_numeric_output"})


def describe_output(m: ModelResult) -> str:
    """``name DATATYPE [shape]`` of one side's output, as the report shows it."""
    shape = m.shape if m.shape is not None else (None if m.output is None else m.output.shape)
    dims = "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"
    return f"{m.name or '?'} {m.datatype or '?'} {dims} per row"


def _descriptor_key(m: ModelResult) -> tuple[Any, ...]:
    """Everything :func:`contract_violation` reads of one side (errors by full text)."""
    out = m.output
    if m.shape is not None and m.datatype is not None and out is not None:
        return (m.error, m.name, m.datatype, m.shape)  # the descriptor says it all
    return (m.error, m.name, m.datatype, m.shape, out is None) + (
        () if out is None else (out.shape, out.dtype.kind)
    )


def contract_violation(ch: ModelResult, ca: ModelResult) -> str | None:
    """Why the candidate's output breaks the champion's contract, or None.

    Only judged when the champion answered: a champion failure says nothing about the
    candidate's interface.
    """
    if ch.error is not None or ch.output is None:
        return None
    if ca.error is not None:
        token = ca.error.split(":", 1)[0].strip()
        return f"candidate {ca.error}" if token in CONTRACT_ERRORS else None
    if ca.output is None:
        return "candidate returned no output"
    if ch.name is not None and ca.name is not None and ch.name != ca.name:
        return f"output name {ca.name!r} instead of {ch.name!r}"
    fam_c, fam_a = datatype_family(ch.datatype), datatype_family(ca.datatype)
    if (ch.output.dtype == object) != (ca.output.dtype == object):
        fam_c = fam_c or ("bytes" if ch.output.dtype == object else "numeric")
        fam_a = fam_a or ("bytes" if ca.output.dtype == object else "numeric")
    if fam_c is not None and fam_a is not None and fam_c != fam_a:
        return f"datatype {ca.datatype or fam_a} instead of {ch.datatype or fam_c}"
    shape_c = ch.shape if ch.shape is not None and ca.shape is not None else ch.output.shape
    shape_a = ca.shape if ch.shape is not None and ca.shape is not None else ca.output.shape
    if tuple(shape_c) != tuple(shape_a):
        what = "class count" if len(shape_c) == len(shape_a) == 1 else "shape"
        return f"{what}: candidate {list(shape_a)} vs champion {list(shape_c)} per row"
    return None


def _is_timeout(err: str) -> bool:
    e = err.lower()
    return "timeout" in e or "timed out" in e or "deadline" in e


def _stack(
    outputs: list[np.ndarray | None], n: int, prefer: tuple[int, ...] | None = None
) -> tuple[FloatArray | None, BoolArray]:
    """Stack per-row outputs of the batch's most common shape (``prefer`` when any row has
    it: the champion's, so that candidate rows keeping the contract stay comparable);
    other rows are masked."""
    if n and all(o is not None for o in outputs):
        try:  # the common case: every row has an output of the same shape
            arr = np.array(outputs, dtype=np.float64)
        except ValueError:
            arr = None
        if arr is not None and arr.ndim >= 1 and arr.shape[0] == n:
            return arr, np.asarray(np.isfinite(arr.reshape(n, -1)).all(axis=1))
    shapes = Counter(o.shape for o in outputs if o is not None)
    ok = np.zeros(n, dtype=bool)
    if not shapes:
        return None, ok
    shape = prefer if prefer is not None and prefer in shapes else shapes.most_common(1)[0][0]
    rows = [i for i, o in enumerate(outputs) if o is not None and o.shape == shape]
    full = np.full((n, *shape), np.nan, dtype=np.float64)
    if rows:
        full[rows] = np.stack([o for i in rows if (o := outputs[i]) is not None])
        ok[rows] = True
    ok &= np.isfinite(full.reshape(n, -1)).all(axis=1)
    return full, ok


def _numeric(m: ModelResult) -> np.ndarray | None:
    if m.error is not None or m.output is None or m.output.dtype.kind == "O":
        return None
    return m.output


def _texts(side: list[ModelResult]) -> list[str | None] | None:
    """One string per row for BYTES outputs (None elsewhere); None when no row has text."""
    if not any(m.output is not None and m.output.dtype.kind == "O" for m in side):
        return None
    return [
        "\x1f".join(str(v) for v in m.output.reshape(-1))
        if m.error is None and m.output is not None and m.output.dtype == object
        else None
        for m in side
    ]


def _slice_codes(dicts: list[dict[str, str]]) -> dict[str, tuple[list[str], IntArray]]:
    """Per slice key: its values in first-appearance order and each row's index (-1: none)."""
    keys: set[str] = set().union(*dicts) if dicts else set()
    out: dict[str, tuple[list[str], IntArray]] = {}
    for key in sorted(keys):
        mapping: dict[str, int] = {}
        get = mapping.setdefault
        codes = [-1 if (v := d.get(key)) is None else get(v, len(mapping)) for d in dicts]
        out[key] = (list(mapping), np.array(codes, dtype=np.int64))
    return out


def _feature_column(values: list[Any]) -> NDArray[Any]:
    """A typed column when every value is an int or every one a float (``feature`` and
    ``feature_values`` then read the same numbers without a loop), objects otherwise."""
    kinds = set(map(type, values))
    if kinds == {float}:
        return np.array(values, dtype=np.float64)
    if kinds == {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    col = np.empty(len(values), dtype=object)
    col[:] = values
    return col


def request_rows(ids: Sequence[str]) -> tuple[IntArray, BoolArray]:
    """Per row: its request's number within ``ids`` (the rows ``<request id>#<row>`` of a
    batched request share one; a row without that suffix is a request of its own), and
    whether it is the request's first row (False on rows ``1..B-1``; decided per id, so a
    request split over two batches still has one first row)."""
    keys = []
    first = np.ones(len(ids), dtype=bool)
    for i, rid in enumerate(ids):
        head, sep, row = rid.rpartition("#")
        batched = bool(sep) and row.isdigit()
        keys.append(head if batched else rid)
        first[i] = not batched or row == "0"
    if not keys:
        return np.zeros(0, dtype=np.int64), first
    _, groups = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return groups.astype(np.int64), first


@dataclass
class PairBatch:
    """Column view of ``records``; ``n`` rows, arrays aligned with the record order."""

    records: Sequence[PairRecord]
    n: int
    ts: FloatArray
    champion: FloatArray | None
    candidate: FloatArray | None
    comparable: BoolArray  # both outputs present, finite, same shape
    contract_fault: BoolArray  # the candidate's output breaks the champion's contract
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
    # BYTES outputs: one string per row (the row's strings joined), None where not text
    champion_text: list[str | None] | None = None
    candidate_text: list[str | None] | None = None
    # descriptors (most common on the champion side): what kinds are inferred from
    output_name: str | None = None
    datatype: str | None = None
    # first contract violation seen in this batch: (reason, champion, candidate) text
    contract_example: tuple[str, str, str] | None = None
    # True on the first (or only) row of each request, None: every row is its own
    # request (column-built batches). Call-level quantities (a call's latency) are one
    # observation per request, not one per row: the B rows of a batched request share
    # one champion and one candidate call (records.py: ids ``<request id>#<row>``).
    first_row: BoolArray | None = None
    # The request each row belongs to (rows of one batched request share a number; None
    # with first_row): call outcomes are judged per request, "failed" if any row failed.
    request: IntArray | None = None
    _features: dict[str, tuple[FloatArray, NDArray[Any] | None]] = field(default_factory=dict)
    _derived: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Sequence[PairRecord]) -> PairBatch:
        n = len(records)
        ch = [r.champion for r in records]
        ca = [r.candidate for r in records]
        ch_err_s = [m.error for m in ch]
        ca_err_s = [m.error for m in ca]
        champion, ch_ok = _stack([_numeric(m) for m in ch], n)
        prefer = None if champion is None else tuple(champion.shape[1:])
        candidate, ca_ok = _stack([_numeric(m) for m in ca], n, prefer)
        ch_text, ca_text = _texts(ch), _texts(ca)
        if ch_text is not None or ca_text is not None:
            ch_ok = ch_ok | np.array([t is not None for t in ch_text or [None] * n], dtype=bool)
            ca_ok = ca_ok | np.array([t is not None for t in ca_text or [None] * n], dtype=bool)
        fault = np.zeros(n, dtype=bool)
        example: tuple[str, str, str] | None = None
        # Pairs of a batch nearly always share their descriptors: judge each distinct
        # (champion, candidate) descriptor pair once.
        seen: dict[tuple[Any, Any], str | None] = {}
        for i, (a, b) in enumerate(zip(ch, ca, strict=True)):
            key = (_descriptor_key(a), _descriptor_key(b))
            if key in seen:
                why = seen[key]
            else:
                why = seen[key] = contract_violation(a, b)
            if why is not None:
                fault[i] = True
                if example is None:
                    example = (why, describe_output(a), describe_output(b))
        comparable = ch_ok & ca_ok & ~fault
        if champion is not None and candidate is not None:
            if champion.shape[1:] != candidate.shape[1:]:
                # rows of other shapes are contract faults above; these are not comparable
                comparable &= ch_text is not None and ca_text is not None
        ch_err = np.array([e is not None for e in ch_err_s], dtype=bool)
        ca_err = np.array([e is not None for e in ca_err_s], dtype=bool) | fault
        names = Counter(m.name for m in ch if m.name is not None)
        dtypes = Counter(m.datatype for m in ch if m.datatype is not None)
        no = np.zeros(n, dtype=bool)
        ch_to, ca_to, observed = no, no.copy(), np.ones(n, dtype=bool)
        if ch_err.any() or ca_err.any():
            ch_to = np.array([e is not None and _is_timeout(e) for e in ch_err_s], dtype=bool)
            ca_to = np.array([e is not None and _is_timeout(e) for e in ca_err_s], dtype=bool)
            observed = np.array(
                [
                    a not in NOT_OBSERVED and b not in NOT_OBSERVED
                    for a, b in zip(ch_err_s, ca_err_s, strict=True)
                ],
                dtype=bool,
            )
        request, first_row = request_rows([r.id for r in records])
        return cls(
            records=records,
            n=n,
            ts=np.array([r.ts for r in records], dtype=np.float64),
            champion=champion,
            candidate=candidate,
            comparable=comparable,
            contract_fault=fault,
            champion_error=ch_err,
            candidate_error=ca_err,
            champion_timeout=ch_to,
            candidate_timeout=ca_to,
            observed=observed,
            # None becomes NaN in a float array
            champion_latency=np.array([m.latency_ms for m in ch], dtype=np.float64),
            candidate_latency=np.array([m.latency_ms for m in ca], dtype=np.float64),
            slices=_slice_codes([r.slices for r in records]),
            champion_text=ch_text,
            candidate_text=ca_text,
            output_name=names.most_common(1)[0][0] if names else None,
            datatype=dtypes.most_common(1)[0][0] if dtypes else None,
            contract_example=example,
            first_row=first_row,
            request=request,
        )

    @classmethod
    def from_columns(cls, cols: PairColumns) -> PairBatch:
        """The batch :meth:`from_records` builds from ``cols.records()``, without the records.

        Every row of ``cols`` has both outputs, no error and its side's one shape and
        descriptor (gates/columns.py), so what ``from_records`` works out row by row is
        one fact per batch here: one contract verdict, one output name and datatype.
        tests/gates/test_columns.py checks the two batches array by array.
        """
        n = cols.n
        champion = np.asarray(cols.champion, dtype=np.float64)
        candidate = np.asarray(cols.candidate, dtype=np.float64)
        ch0, ca0 = cols.side("champion", 0), cols.side("candidate", 0)
        why = contract_violation(ch0, ca0) if n else None
        fault = np.full(n, why is not None, dtype=bool)
        example = None if why is None else (why, describe_output(ch0), describe_output(ca0))
        ch_ok = np.isfinite(champion.reshape(n, -1)).all(axis=1)
        ca_ok = np.isfinite(candidate.reshape(n, -1)).all(axis=1)
        comparable = ch_ok & ca_ok & ~fault
        if champion.shape[1:] != candidate.shape[1:]:
            comparable &= False  # a contract fault above; never compared
        no = np.zeros(n, dtype=bool)
        # features: a column per name in first-appearance order, None where a row has none
        # (what feature_values/feature_names read off records)
        names: dict[str, None] = {}
        for d in cols.features:
            if d:
                names.update(dict.fromkeys(d))
        features: dict[str, NDArray[Any]] = {}
        for name in names:
            features[name] = _feature_column([d.get(name) for d in cols.features])
        request, first_row = request_rows(cols.ids)
        return cls(
            records=(),
            n=n,
            ts=np.array(cols.ts, dtype=np.float64),
            champion=champion,
            candidate=candidate,
            comparable=comparable,
            contract_fault=fault,
            champion_error=no,
            candidate_error=fault.copy(),
            champion_timeout=no.copy(),
            candidate_timeout=no.copy(),
            observed=np.ones(n, dtype=bool),
            champion_latency=np.array(cols.champion_latency, dtype=np.float64),
            candidate_latency=np.array(cols.candidate_latency, dtype=np.float64),
            slices=_slice_codes(cols.slices),
            labels=list(cols.labels),
            feature_columns=features,
            output_name=cols.champion_desc[0],
            datatype=cols.champion_desc[1],
            contract_example=example,
            first_row=first_row,
            request=request,
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
            contract_fault=no,
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
        return self.select(np.arange(start, self.n))

    def select(self, rows: IntArray) -> PairBatch:
        """These rows (indices, in order) as a new batch, without rebuilding from records."""

        def cut(a: Any) -> Any:
            return None if a is None else a[rows]

        labels = self.labels
        if labels is not None and not isinstance(labels, np.ndarray):
            labels = [labels[i] for i in rows]
        return PairBatch(
            records=[self.records[i] for i in rows] if self.records else (),
            n=len(rows),
            ts=self.ts[rows],
            champion=cut(self.champion),
            candidate=cut(self.candidate),
            comparable=self.comparable[rows],
            contract_fault=self.contract_fault[rows],
            champion_error=self.champion_error[rows],
            candidate_error=self.candidate_error[rows],
            champion_timeout=self.champion_timeout[rows],
            candidate_timeout=self.candidate_timeout[rows],
            observed=self.observed[rows],
            first_row=None if self.first_row is None else self.first_row[rows],
            request=None if self.request is None else self.request[rows],
            champion_latency=self.champion_latency[rows],
            candidate_latency=self.candidate_latency[rows],
            slices={k: (v, c[rows]) for k, (v, c) in self.slices.items()},
            labels=labels if isinstance(labels, list) else cut(labels),
            feature_columns=None
            if self.feature_columns is None
            else {k: v[rows] for k, v in self.feature_columns.items()},
            champion_text=None
            if self.champion_text is None
            else [self.champion_text[i] for i in rows],
            candidate_text=None
            if self.candidate_text is None
            else [self.candidate_text[i] for i in rows],
            output_name=self.output_name,
            datatype=self.datatype,
            contract_example=self.contract_example,
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
            if arr is not None and _is_class_index(arr, self.datatype):
                self._derived[key] = one_hot(arr)
            else:
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


CLASS_INDEX_WIDTH = 64


def _is_class_index(arr: FloatArray, datatype: str | None) -> bool:
    return datatype_family(datatype) == "integer" and arr.reshape(arr.shape[0], -1).shape[1] == 1


def one_hot(arr: FloatArray) -> FloatArray:
    """Class ids as one-hot rows, so class-share statistics (output drift) read them as
    classes, not as P(class 1). A fixed width (64, or the next power of two above the
    largest id) keeps per-class counts of successive batches aligned."""
    ids = np.nan_to_num(arr.reshape(arr.shape[0], -1)[:, 0]).astype(np.int64)
    ids = np.maximum(ids, 0)
    top = int(ids.max()) + 1 if ids.size else 1
    width = CLASS_INDEX_WIDTH if top <= CLASS_INDEX_WIDTH else 1 << (top - 1).bit_length()
    out: FloatArray = np.zeros((arr.shape[0], width))
    out[np.arange(arr.shape[0]), ids] = 1.0
    return out


def class_labels(raw: list[Any] | NDArray[Any], n_classes: int) -> IntArray:
    """Integer class per row; -1 where the label is missing or not a valid class index."""
    if not isinstance(raw, np.ndarray) and raw and all(type(v) is int for v in raw):
        raw = np.array(raw, dtype=np.int64)  # the usual case: integer class labels
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


def batch_kind(batch: PairBatch, kind: str, kinds: dict[str, str], task: str) -> str | None:
    """The output kind of this batch: the configured one, else inferred (gates/kinds.py).

    None while the batch has nothing to infer from (no champion output yet).
    """
    fixed = configured_kind(batch.output_name, kind, kinds)
    if fixed is not None:
        return fixed
    key = f"kind:{task}"
    if key not in batch._derived:
        values = batch.champion if batch.champion is not None else batch.candidate
        rows = batch.comparable if values is not None else None
        strings = batch.champion_text is not None or batch.candidate_text is not None
        batch._derived[key] = infer_kind(
            None if values is None or rows is None or not rows.any() else values[rows],
            datatype=batch.datatype,
            task=task,
            strings=strings,
        )
    inferred: str | None = batch._derived[key]
    return inferred
