"""Harvest rules and the pinned-case judgement (gates/harvest.py): pure, on built records."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gates.harvest import (
    CANDIDATE_ERROR,
    DISAGREEMENT,
    LABEL_FREE,
    WRONG_LABEL,
    case_outcome,
    class_label,
    match_rules,
    rule_masks,
)
from gates.records import Label, ModelResult, PairRecord
from gates.settings import GatesSettings, HarvestSettings


def rec(
    rid: str,
    champ: list[float] | float | None,
    cand: list[float] | float | None,
    label: Label = None,
    *,
    cand_error: str | None = None,
    champ_error: str | None = None,
) -> PairRecord:
    def result(out: list[float] | float | None, error: str | None) -> ModelResult:
        if error is not None or out is None:
            return ModelResult(None, 1.0, error or "missing")
        return ModelResult(np.asarray(out, dtype=np.float64), 1.0, None)

    return PairRecord(
        id=rid,
        ts=1.0,
        champion=result(champ, champ_error),
        candidate=result(cand, cand_error),
        label=label,
    )


def test_each_rule_catches_its_case_and_nothing_else() -> None:
    records = [
        rec("agree-right", [0.9, 0.1], [0.8, 0.2], 0),
        rec("cand-wrong", [0.95, 0.05], [0.08, 0.92], 0),
        rec("champ-wrong", [0.2, 0.8], [0.9, 0.1], 0),
        rec("confident-split", [0.95, 0.05], [0.04, 0.96]),
        rec("unsure-split", [0.6, 0.4], [0.45, 0.55]),
        rec("cand-error", [0.9, 0.1], None, cand_error="timeout: slow"),
        rec("both-error", None, None, champ_error="backend_error: x", cand_error="timeout: y"),
    ]
    masks = rule_masks(records, HarvestSettings())
    assert masks[WRONG_LABEL].tolist() == [False, True, True, False, False, False, False]
    assert masks[DISAGREEMENT].tolist() == [False, True, False, True, False, False, False]
    assert masks[CANDIDATE_ERROR].tolist() == [False, False, False, False, False, True, False]
    # One rule per record, in RULES order (candidate_error, wrong_label, disagreement).
    assert match_rules(records, HarvestSettings()) == [
        None,
        WRONG_LABEL,
        WRONG_LABEL,
        DISAGREEMENT,
        None,
        CANDIDATE_ERROR,
        None,
    ]
    # Label-free rules only (what the proxy runs before labels arrive).
    assert match_rules(records, HarvestSettings(), rules=LABEL_FREE)[1] == DISAGREEMENT


def test_settings_switch_rules_and_confidence() -> None:
    records = [rec("s", [0.85, 0.15], [0.1, 0.9], 0), rec("e", [1.0, 0.0], None, cand_error="x")]
    assert match_rules(records, HarvestSettings(min_confidence=0.95, wrong_label=False)) == [
        None,
        CANDIDATE_ERROR,
    ]
    assert match_rules(records, HarvestSettings(min_confidence=0.8, wrong_label=False)) == [
        DISAGREEMENT,
        CANDIDATE_ERROR,
    ]
    assert match_rules(records, HarvestSettings(enabled=False)) == [None, None]
    assert match_rules(records, HarvestSettings(candidate_error=False)) == [WRONG_LABEL, None]
    with pytest.raises(ValidationError):
        GatesSettings.model_validate({"harvest": {"min_confidence": 1.5}})
    with pytest.raises(ValidationError):
        GatesSettings.model_validate({"harvest": {"unknown": 1}})


def test_regression_wrong_label_uses_the_tolerance() -> None:
    records = [
        rec("close", 10.5, 10.2, 10.0),  # within 0 + 0.1*10
        rec("far-cand", 10.5, 12.0, 10.0),
        rec("no-label", 1.0, 100.0),
    ]
    settings = HarvestSettings(regression_rtol=0.1)
    assert match_rules(records, settings, task="regression") == [None, WRONG_LABEL, None]
    # disagreement is for classes only
    assert DISAGREEMENT not in rule_masks(records, settings, task="regression")


def test_string_and_float_class_labels() -> None:
    assert class_label("3") == 3 and class_label(2.0) == 2 and class_label(True) is None
    assert class_label("cat") is None and class_label(None) is None
    records = [rec("a", [0.1, 0.9], [0.2, 0.8], "1"), rec("b", [0.1, 0.9], [0.2, 0.8], "0")]
    assert match_rules(records, HarvestSettings(disagreement=False)) == [None, WRONG_LABEL]


def test_vectorised_over_mixed_widths() -> None:
    records = [rec("w2", [0.9, 0.1], [0.1, 0.9], 0), rec("w3", [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], 1)]
    assert match_rules(records, HarvestSettings()) == [WRONG_LABEL, None]
    assert match_rules([], HarvestSettings()) == []


def test_case_outcome_classification_and_tolerance() -> None:
    right = case_outcome(np.array([0.1, 0.7, 0.2]), 1)
    assert right.passed and right.predicted == 1 and right.margin == pytest.approx(0.5)
    wrong = case_outcome(np.array([0.45, 0.4, 0.15]), 1)
    assert not wrong.passed and wrong.margin == pytest.approx(-0.05)
    # a tolerance on the score lets a near-tie pass, not a clear miss
    assert case_outcome(np.array([0.45, 0.4, 0.15]), 1, 0.1).passed
    assert not case_outcome(np.array([0.8, 0.1, 0.1]), 1, 0.1).passed
    assert not case_outcome(None, 1, error="timeout: x").passed
    assert not case_outcome(np.array([0.5, 0.5]), 7).passed  # no such class
    assert not case_outcome(np.array([np.nan, 1.0]), 1).passed


def test_case_outcome_regression() -> None:
    assert case_outcome(np.array(3.0), 3.0).passed
    assert not case_outcome(np.array(3.2), 3.0).passed
    ok = case_outcome(np.array([3.2]), 3.0, 0.5)
    assert ok.passed and ok.margin == pytest.approx(0.3)
    assert not case_outcome(np.array(3.0), "three").passed
