"""Output kinds: what a gated output means, inferred from its descriptor and data.

A kind decides how two outputs are compared (tolerance), what agreement means, how a
label is read (a class id, a number, a vector, a string) and which metric applies:

===================  =====================================  ===============================
kind                 tolerance / agreement                  labels and metric
===================  =====================================  ===============================
class_index          flip (classes differ)                  class id: accuracy, recall
probabilities        shift, flip, collapse                  class id: accuracy, recall, hc
logits               same, after a softmax                  same as probabilities
multilabel           shift, flip (any label decision)       0/1 vector: exact-set accuracy
scalar_regression    regression (atol + rtol)               number: MAE, RMSE
vector_regression    regression on every element, norm      vector: MAE, RMSE of the row's
                                                            root-mean-square error
embedding            cosine distance                        none
string               mismatch (exact match)                 string: accuracy (exact match)
===================  =====================================  ===============================

Inference (``gates.kind: auto``), from the first batch a gate sees, then fixed: BYTES is
``string``; ``task: embedding`` is ``embedding``; ``task: regression`` is scalar or vector
regression by the per-row size; an integer datatype with one value per row is
``class_index`` (also float data that is integer-valued with a value above 1); one float per
row is ``probabilities`` (P(class 1) of a binary classifier, a logit outside [0, 1]) under
``classification`` and ``scalar_regression`` under ``auto``; rows of several values are
``probabilities`` when every row is non-negative and sums to 1, ``multilabel`` when every
value is in [0, 1] otherwise, else ``logits``. A configured kind (``gates.kind`` or per
output ``gates.kinds``) always wins; a kind name outside this list is a start-up error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray

Kind = Literal[
    "class_index",
    "probabilities",
    "logits",
    "multilabel",
    "scalar_regression",
    "vector_regression",
    "embedding",
    "string",
]
KINDS: tuple[str, ...] = get_args(Kind)

FloatArray = NDArray[np.float64]

TASK_OF: dict[str, str] = {
    "class_index": "classification",
    "probabilities": "classification",
    "logits": "classification",
    "multilabel": "classification",
    "scalar_regression": "regression",
    "vector_regression": "regression",
    "embedding": "embedding",
    "string": "classification",
}

#: kinds whose rows are class scores (a probability vector after ``class_scores``)
SCORED = frozenset({"probabilities", "logits"})

_FAMILIES = {
    "FP16": "float",
    "FP32": "float",
    "FP64": "float",
    "BF16": "float",
    "INT8": "integer",
    "INT16": "integer",
    "INT32": "integer",
    "INT64": "integer",
    "UINT8": "integer",
    "UINT16": "integer",
    "UINT32": "integer",
    "UINT64": "integer",
    "BOOL": "bool",
    "BYTES": "bytes",
}


def datatype_family(datatype: str | None) -> str | None:
    """float / integer / bool / bytes; None when unknown (no descriptor)."""
    if datatype is None:
        return None
    return _FAMILIES.get(datatype.upper(), datatype.upper())


def check_kind(value: Any, where: str) -> str:
    """A kind name, or ValueError naming the output (a start-up error, never a default)."""
    if value not in KINDS:
        raise ValueError(f"{where}: unknown output kind {value!r}; one of {', '.join(KINDS)}")
    return str(value)


def configured_kind(name: str | None, kind: str, kinds: Mapping[str, str]) -> str | None:
    """The kind the configuration fixes for this output, None for ``auto``."""
    if name is not None and name in kinds:
        return kinds[name]
    return None if kind == "auto" else kind


def task_for(kind: str, kinds: Mapping[str, str], task: str) -> str:
    """The task the non-kind-aware gates (drift) use: the configured kinds' task if one."""
    tasks = {TASK_OF[k] for k in ([kind] if kind != "auto" else []) + list(kinds.values())}
    if len(tasks) == 1:
        return tasks.pop()
    return task


def infer_kind(
    values: FloatArray | None,
    *,
    datatype: str | None,
    task: str,
    strings: bool = False,
) -> str | None:
    """The kind of a batch's outputs (rows x values); None when nothing to go on yet."""
    if strings or datatype_family(datatype) == "bytes":
        return "string"
    if values is None or values.size == 0:
        return None
    x = values.reshape(values.shape[0], -1)
    x = x[np.isfinite(x).all(axis=1)]
    if x.shape[0] == 0:
        return None
    width = x.shape[1]
    if task == "embedding":
        return "embedding"
    if task == "regression":
        return "scalar_regression" if width == 1 else "vector_regression"
    if width == 1:
        fam = datatype_family(datatype)
        integral = bool((x == np.round(x)).all())
        if fam in ("integer", "bool") or (fam is None and integral and bool((x > 1).any())):
            return "class_index"
        return "probabilities" if task == "classification" else "scalar_regression"
    if ((x >= -1e-9).all(axis=1) & (np.abs(x.sum(axis=1) - 1.0) <= 1e-3)).all():
        return "probabilities"
    if ((x >= 0) & (x <= 1)).all():
        return "multilabel"
    return "logits"


# ---------------------------------------------------------------------- per-kind views


def softmax(x: FloatArray) -> FloatArray:
    z = np.nan_to_num(x) - np.nan_to_num(x).max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def class_predictions(arr: FloatArray, kind: str) -> NDArray[np.int64]:
    """Predicted class per row of a class_index output (rounded, -1 when not a class)."""
    v = arr.reshape(arr.shape[0], -1)[:, 0]
    good = np.isfinite(v) & (v >= 0)
    return np.where(good, np.round(np.nan_to_num(v)), -1).astype(np.int64)


def multilabel_decisions(arr: FloatArray, threshold: float = 0.5) -> NDArray[np.bool_]:
    out: NDArray[np.bool_] = arr.reshape(arr.shape[0], -1) >= threshold
    return out


def vector_labels(raw: list[Any] | NDArray[Any], width: int) -> FloatArray:
    """Rows x width floats; NaN rows where the label is not a vector of that width."""
    out = np.full((len(raw), width), np.nan)
    if isinstance(raw, np.ndarray) and raw.ndim == 2 and raw.shape[1] == width:
        return np.asarray(raw, dtype=np.float64)
    for i, v in enumerate(raw):
        if width == 1 and isinstance(v, int | float) and not isinstance(v, bool):
            out[i, 0] = float(v)
            continue
        if not isinstance(v, list | tuple | np.ndarray) or len(v) != width:
            continue
        try:
            row = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if np.isfinite(row).all():
            out[i] = row
    return out


def string_labels(raw: list[Any] | NDArray[Any]) -> list[str | None]:
    return [v if isinstance(v, str) else None for v in raw]
