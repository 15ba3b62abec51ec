"""The report at a glance: the line under the verdict, advisory failures on a PROMOTE,
each pinned case's predictions and who was wrong, the slice table from the deciding cell."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from proxy.report import render_html, validate_document
from proxy.report.collect import _predictions


def _verdict_html(page: str) -> str:
    return page.split('id="verdict"')[1].split("</section>")[0]


def test_summary_line_counts_blocking_cells_and_names_advisory_failures(
    sample_doc: dict[str, Any],
) -> None:
    doc = copy.deepcopy(sample_doc)
    doc["rollout"]["preset"] = "retrained"
    validate_document(doc)
    page = render_html(doc)
    blocking = [g for g in doc["gates"] if g["blocking"]]
    want = {k: sum(g["status"] == k for g in blocking) for k in ("pass", "fail", "inconclusive")}
    glance = _verdict_html(page)
    assert (
        f"blocking cells: {want['pass']} pass, {want['fail']} fail, {want['inconclusive']} waiting"
    ) in glance
    assert "preset retrained" in glance
    assert "advisory" not in glance  # no advisory failure in the sample


def test_advisory_failures_are_shown_as_such_on_a_promote(sample_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(sample_doc)
    doc["verdict"].update(verdict="promote", reason="promote: all required cells PASS")
    for g in doc["gates"]:
        g["status"] = "pass" if g["blocking"] else g["status"]
    shift = copy.deepcopy(doc["gates"][0])
    shift.update(name="tolerance.shift", blocking=False, status="fail", reason="WARNING: moved")
    doc["gates"].append(shift)
    validate_document(doc)
    glance = _verdict_html(render_html(doc))
    blocking = sum(g["blocking"] for g in doc["gates"])
    assert f"blocking cells: {blocking} pass, 0 fail, 0 waiting" in glance
    assert "1 advisory failure (despite: evidence only, never blocking): tolerance.shift" in glance


def test_pinned_cases_show_each_models_prediction_and_who_was_wrong(
    sample_doc: dict[str, Any],
) -> None:
    case = sample_doc["pinned"]["harvested"][0]  # label 1: champion [0.18, 0.82], cand [0.71, ...]
    extra = _predictions(
        np.array(case["champion_output"]), np.array(case["candidate_output"]), case["label"], None
    )
    assert extra == {"champion_prediction": 1, "candidate_prediction": 0, "wrong": "candidate"}
    doc = copy.deepcopy(sample_doc)
    doc["pinned"]["harvested"][0].update(extra)
    validate_document(doc)
    pinned = render_html(doc).split('id="pinned"')[1].split("</section>")[0]
    assert "champion predicted" in pinned and "candidate predicted" in pinned
    assert '<span class="wrong wrong-candidate">candidate</span>' in pinned


def test_predictions_per_output_kind() -> None:
    # class index, regression value (within / outside 10% of the label), strings
    assert _predictions(np.array([3.0]), np.array([2.0]), 3, None)["wrong"] == "candidate"
    assert _predictions(np.array(10.0), np.array(12.0), 10.5, None) == {
        "champion_prediction": 10,
        "candidate_prediction": 12,
        "wrong": "candidate",
    }
    both = _predictions(
        np.array(["cat"], dtype=object), np.array(["dog"], dtype=object), "cow", None
    )
    assert both == {"champion_prediction": "cat", "candidate_prediction": "dog", "wrong": "both"}
    assert (
        _predictions(np.array([0.2, 0.8]), np.array([0.3, 0.7]), None, None)["wrong"] == "no label"
    )
