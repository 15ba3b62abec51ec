"""Harvest rules: which mirrored pairs are worth keeping as pinned-failure candidates.

Pure numpy over a batch of :class:`PairRecord`; the proxy runs it off the live path on
every pair (label-free rules) and on every labelled pair (the label rule), and persists
what matches (``proxy/control/harvest.py``). Rules, in the order a record is attributed to them
(a record is caught once, by the first rule that matches):

* ``candidate_error``: the candidate failed (error, timeout, bad output) on an input the
  champion answered;
* ``wrong_label``: a labelled pair where the champion or the candidate got the label
  wrong (classification: top class != label; regression: ``|y - label| > atol +
  rtol*|label|``);
* ``disagreement``: both models are confident (top score >= ``min_confidence``) and
  pick different classes, label or not.

:func:`case_outcome` is the single definition of "the model got a pinned case right",
shared by the suite runner, the pytest plugin, the start-of-rollout check and the live
pinned check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gates.kinds import datatype_family
from gates.records import Label, PairRecord
from gates.settings import HarvestSettings, Task

CANDIDATE_ERROR = "candidate_error"
WRONG_LABEL = "wrong_label"
DISAGREEMENT = "disagreement"
RULES: tuple[str, ...] = (CANDIDATE_ERROR, WRONG_LABEL, DISAGREEMENT)
LABEL_FREE: tuple[str, ...] = (CANDIDATE_ERROR, DISAGREEMENT)


def class_label(label: Label) -> int | None:
    """A class index from a label (int, integral float, or a digit string), else None."""
    if isinstance(label, bool) or label is None:
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return None


def _vectors(outputs: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top class, top score, is-vector mask) per output; -1 / NaN where there is none."""
    n = len(outputs)
    top = np.full(n, -1, dtype=np.int64)
    score = np.full(n, np.nan)
    vector = np.zeros(n, dtype=bool)
    # Group equal widths so each group is one argmax over a 2-D array.
    widths: dict[int, list[int]] = {}
    for i, out in enumerate(outputs):
        if out is not None and np.ndim(out) == 1 and np.size(out) > 1:
            widths.setdefault(int(np.size(out)), []).append(i)
    for idx in widths.values():
        block = np.stack([np.asarray(outputs[i], dtype=np.float64) for i in idx])
        arg = block.argmax(axis=1)
        rows = np.asarray(idx)
        top[rows] = arg
        score[rows] = block[np.arange(len(idx)), arg]
        vector[rows] = True
    return top, score, vector


def _scalars(outputs: Sequence[np.ndarray | None]) -> np.ndarray:
    return np.array(
        [
            float(np.asarray(o).reshape(-1)[0]) if o is not None and np.size(o) == 1 else np.nan
            for o in outputs
        ]
    )


def rule_masks(
    records: Sequence[PairRecord],
    settings: HarvestSettings,
    *,
    task: Task = "auto",
    rules: Sequence[str] = RULES,
) -> dict[str, np.ndarray]:
    """A boolean mask over ``records`` for each enabled rule among ``rules``."""
    n = len(records)
    masks: dict[str, np.ndarray] = {}
    if n == 0 or not settings.enabled:
        return masks
    ch_ok = np.array([r.champion.ok for r in records])
    ca_ok = np.array([r.candidate.ok for r in records])
    ch_out = [r.champion.output if r.champion.ok else None for r in records]
    ca_out = [r.candidate.output if r.candidate.ok else None for r in records]
    ch_top, ch_score, ch_vec = _vectors(ch_out)
    ca_top, ca_score, ca_vec = _vectors(ca_out)
    classify = task in ("auto", "classification")
    if CANDIDATE_ERROR in rules and settings.candidate_error:
        masks[CANDIDATE_ERROR] = ch_ok & ~ca_ok
    if DISAGREEMENT in rules and settings.disagreement and classify:
        with np.errstate(invalid="ignore"):
            confident = (ch_score >= settings.min_confidence) & (
                ca_score >= settings.min_confidence
            )
        masks[DISAGREEMENT] = ch_vec & ca_vec & confident & (ch_top != ca_top)
    if WRONG_LABEL in rules and settings.wrong_label:
        cls = np.array([class_label(r.label) for r in records], dtype=object)
        has_cls = np.array([c is not None for c in cls])
        cls_int = np.array([c if c is not None else -2 for c in cls], dtype=np.int64)
        wrong = np.zeros(n, dtype=bool)
        if classify:
            wrong |= has_cls & ch_vec & (ch_top != cls_int)
            wrong |= has_cls & ca_vec & (ca_top != cls_int)
            # class-index outputs (an integer datatype, one class id per row)
            for side, side_out in (("champion", ch_out), ("candidate", ca_out)):
                ids = _scalars(side_out)
                index = np.array(
                    [datatype_family(getattr(r, side).datatype) == "integer" for r in records]
                )
                with np.errstate(invalid="ignore"):
                    wrong |= has_cls & index & np.isfinite(ids) & (ids != cls_int)
        if task in ("auto", "regression"):
            num = np.array(
                [
                    float(r.label)
                    if isinstance(r.label, int | float) and not isinstance(r.label, bool)
                    else np.nan
                    for r in records
                ]
            )
            bound = settings.regression_atol + settings.regression_rtol * np.abs(num)
            with np.errstate(invalid="ignore"):
                for out, vec in ((_scalars(ch_out), ch_vec), (_scalars(ca_out), ca_vec)):
                    wrong |= ~vec & np.isfinite(out) & (np.abs(out - num) > bound)
        masks[WRONG_LABEL] = wrong
    return masks


def match_rules(
    records: Sequence[PairRecord],
    settings: HarvestSettings,
    *,
    task: Task = "auto",
    rules: Sequence[str] = RULES,
) -> list[str | None]:
    """The first matching rule per record (in :data:`RULES` order), None when none."""
    masks = rule_masks(records, settings, task=task, rules=rules)
    out: list[str | None] = [None] * len(records)
    for rule in reversed(RULES):  # earlier rules overwrite later ones
        mask = masks.get(rule)
        if mask is None:
            continue
        for i in np.flatnonzero(mask):
            out[int(i)] = rule
    return out


@dataclass(frozen=True, slots=True)
class CaseOutcome:
    """Whether a model's output meets a pinned case's expectation, and by how much.

    ``margin`` > 0 means passed with room: classification, the expected class's score
    minus the best other class's (plus the tolerance); regression, the tolerance minus
    the absolute error.
    """

    passed: bool
    margin: float
    predicted: float | int | None
    detail: str


def case_outcome(
    output: np.ndarray | None,
    expected: Label,
    score_tolerance: float | None = None,
    *,
    error: str | None = None,
) -> CaseOutcome:
    """Judge one output against a pinned expectation.

    Classification (a vector output, a class label): passed when the expected class has
    the top score; with ``score_tolerance`` t, also when it is within t of the top score
    (for inputs that are genuinely ambiguous). Regression (a scalar output): passed when
    ``|y - expected| <= t`` (t defaults to 0: exact). A model error never passes.
    """
    tol = float(score_tolerance or 0.0)
    if error is not None or output is None:
        return CaseOutcome(False, float("-inf"), None, f"model error: {error or 'no output'}")
    arr = np.asarray(output, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        return CaseOutcome(False, float("-inf"), None, "non-finite output")
    cls = class_label(expected)
    if arr.size > 1:
        if cls is None or not 0 <= cls < arr.size:
            return CaseOutcome(
                False, float("-inf"), int(arr.argmax()), f"expected {expected!r} is no class"
            )
        top = int(arr.argmax())
        others = np.delete(arr, cls)
        margin = float(arr[cls] - others.max()) + tol
        passed = margin >= 0 if tol > 0 else top == cls
        return CaseOutcome(
            bool(passed),
            margin,
            top,
            f"expected class {cls}, top class {top} (margin {margin:.4g})",
        )
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        return CaseOutcome(
            False, float("-inf"), float(arr[0]), f"expected {expected!r} is no number"
        )
    err = abs(float(arr[0]) - float(expected))
    return CaseOutcome(
        err <= tol, tol - err, float(arr[0]), f"expected {expected}, got {arr[0]:.6g} (tol {tol:g})"
    )
