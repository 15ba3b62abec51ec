"""Sign-offs against the report digest: matching, mismatch after an edit, the page's marks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.core.errors import BadRequest
from proxy.report import SignOff, check_all, check_signoff, render_html, report_digest, write_pack
from proxy.report.signoff import merge_signoffs
from proxy.report.source import PackSource


def _signoff(digest: str, reviewer: str = "ann", ts: float = 1_764_060_000.0) -> SignOff:
    return SignOff(
        reviewer=reviewer, decision="reject", note="android regression", ts=ts, digest=digest
    )


def test_signoff_matches_the_report_it_signed(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    pack = write_pack(sample_doc, tmp_path)
    recorded = _signoff(report_digest(pack.json_path))
    check = check_signoff(pack.json_path, recorded)
    assert check.matches
    assert check_signoff(sample_doc, recorded).matches


def test_edited_report_no_longer_matches(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    pack = write_pack(sample_doc, tmp_path)
    recorded = _signoff(report_digest(pack.json_path))
    # Someone softens the failing gate after the reviewer signed.
    doc = json.loads(pack.json_path.read_bytes())
    doc["gates"][4]["statistic"] = -0.019
    pack.json_path.write_text(json.dumps(doc))
    check = check_signoff(pack.json_path, recorded)
    assert not check.matches
    assert check.current_digest != recorded.digest


def test_reformatting_keeps_the_match(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    pack = write_pack(sample_doc, tmp_path)
    recorded = _signoff(report_digest(pack.json_path))
    pack.json_path.write_text(json.dumps(json.loads(pack.json_path.read_bytes()), indent=2))
    assert check_signoff(pack.json_path, recorded).matches


def test_page_marks_matching_and_mismatched_signoffs(sample_doc: dict[str, Any]) -> None:
    digest = report_digest(sample_doc)
    stale = "0" * 64
    sample_doc["signoffs"] = [
        _signoff(digest, "ann").to_dict(),
        _signoff(stale, "bob", ts=1_764_050_000.0).to_dict(),
    ]
    checks = {c.signoff.reviewer: c.matches for c in check_all(sample_doc)}
    assert checks == {"ann": True, "bob": False}
    page = render_html(sample_doc)
    signoffs = page.split('id="signoffs"')[1].split("</section>")[0]
    assert signoffs.count("matches this report") == 1
    assert signoffs.count("MISMATCH") == 1
    bob_row = next(r for r in signoffs.split("<tr>") if ">bob<" in r)
    assert "MISMATCH" in bob_row


def test_signoff_parsing_rejects_bad_fields() -> None:
    good = _signoff("a" * 64).to_dict()
    assert SignOff.from_dict(good) == _signoff("a" * 64)
    for field, value, message in [
        ("reviewer", " ", "reviewer"),
        ("decision", "maybe", "decision"),
        ("ts", "yesterday", "ts"),
        ("digest", "A" * 64, "digest"),
        ("digest", "abc", "digest"),
        ("note", 3, "note"),
    ]:
        with pytest.raises(BadRequest, match=message):
            SignOff.from_dict({**good, field: value})


def test_merge_drops_duplicates_and_orders_by_time() -> None:
    a, b = _signoff("a" * 64, "ann", 2.0), _signoff("b" * 64, "bob", 1.0)
    assert merge_signoffs([a, b], [a], [b]) == [b, a]


def test_pack_source_appends_and_filters_by_rollout(
    sample_doc: dict[str, Any], tmp_path: Path
) -> None:
    write_pack(sample_doc, tmp_path)
    source = PackSource(tmp_path)
    rid = sample_doc["rollout"]["id"]
    first, second = _signoff("a" * 64, "ann", 1.0), _signoff("b" * 64, "bob", 2.0)
    source.record_signoff(rid, first)
    source.record_signoff("another-rollout", _signoff("c" * 64, "cy", 3.0))
    source.record_signoff(rid, second)
    assert source.signoffs(rid) == [first, second]
    lines = (tmp_path / "signoffs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["rollout"] == "another-rollout"
    assert source.report_document(rid) == sample_doc


def test_pack_source_reports_bad_lines(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    write_pack(sample_doc, tmp_path)
    good = json.dumps({"rollout": "r", **_signoff("a" * 64).to_dict()})
    path = tmp_path / "signoffs.jsonl"
    path.write_text(good + "\n{oops\n")
    with pytest.raises(BadRequest, match="line 2: not valid JSON"):
        PackSource(tmp_path).signoffs("r")
    path.write_text(good + '\n{"rollout": "r", "reviewer": "x"}\n')
    with pytest.raises(BadRequest, match=r"line 2\.decision"):
        PackSource(tmp_path).signoffs("r")
