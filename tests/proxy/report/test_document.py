"""The report document contract: schema, canonical JSON, digest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jcs
import jsonschema
import pytest

from proxy.core.errors import BadRequest
from proxy.report import (
    canonical_json,
    load_schema,
    report_digest,
    validate_document,
    write_pack,
)


def test_schema_is_valid_draft_2020_12() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_fixture_validates(sample_doc: dict[str, Any]) -> None:
    validate_document(sample_doc)
    # The fixture is the abort-on-a-slice scenario the project exists to catch.
    assert sample_doc["verdict"]["verdict"] == "abort"
    failing = [g for g in sample_doc["gates"] if g["status"] == "fail"]
    assert [(g["name"], g["slice"]) for g in failing] == [("accuracy", "platform=android")]
    aggregate = next(r for r in sample_doc["slice_table"]["rows"] if r["key"] == "all")
    assert aggregate["difference"] > 0  # better on aggregate, worse on one slice


def test_written_pack_validates_against_schema(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    pack = write_pack(sample_doc, tmp_path / "pack")
    written = json.loads(pack.json_path.read_bytes())
    jsonschema.Draft202012Validator(load_schema()).validate(written)
    validate_document(written)
    assert written == sample_doc
    assert pack.html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.pop("verdict"), "$: 'verdict' is a required property"),
        (lambda d: d["gates"][0].update(status="maybe"), "$.gates[0].status"),
        (lambda d: d["verdict"].update(verdict="ship it"), "$.verdict.verdict"),
        (lambda d: d["config"].update(digest="abc"), "$.config.digest"),
        (lambda d: d["gates"][1].update(n=-3), "$.gates[1].n"),
        (lambda d: d.update(surprise=1), "Additional properties"),
        (lambda d: d["latency"]["champion"]["histogram"]["counts"].pop(), "edges for"),
        (lambda d: d["metric_series"][0]["points"][3].update(lower=9.0), "lower > upper"),
        (lambda d: d["gates"][0].update(statistic=math.nan), "not a finite number"),
    ],
)
def test_invalid_documents_are_rejected_with_the_path(
    sample_doc: dict[str, Any], tmp_path: Path, edit: Any, expected: str
) -> None:
    edit(sample_doc)
    with pytest.raises(BadRequest) as info:
        validate_document(sample_doc)
    assert expected in info.value.message
    out = tmp_path / "pack"
    with pytest.raises(BadRequest):
        write_pack(sample_doc, out)
    assert not out.exists()  # nothing half-written


def test_report_json_is_canonical(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    pack = write_pack(sample_doc, tmp_path)
    data = pack.json_path.read_bytes()
    assert data == canonical_json(sample_doc)
    # RFC 8785 (JCS): an independent implementation gives the same bytes.
    assert data == jcs.canonicalize(json.loads(data))
    assert b"\n" not in data and data.startswith(b'{"config":')


def test_digest_is_stable_across_writes(sample_doc: dict[str, Any], tmp_path: Path) -> None:
    first = write_pack(sample_doc, tmp_path / "a")
    # Round trip through the file, then write again elsewhere.
    again = write_pack(json.loads(first.json_path.read_bytes()), tmp_path / "b")
    assert first.json_path.read_bytes() == again.json_path.read_bytes()
    assert first.digest == again.digest == report_digest(sample_doc)
    assert report_digest(first.json_path) == first.digest
    assert report_digest(str(again.json_path)) == first.digest


def test_digest_covers_content_not_formatting_or_signoffs(
    sample_doc: dict[str, Any], tmp_path: Path
) -> None:
    base = report_digest(sample_doc)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(sample_doc, indent=4))
    assert report_digest(pretty) == base
    sample_doc["signoffs"] = [
        {"reviewer": "ann", "decision": "approve", "note": "", "ts": 1.0, "digest": base}
    ]
    assert report_digest(sample_doc) == base  # recording a sign-off changes nothing signed
    sample_doc["counts"]["labels"] += 1
    assert report_digest(sample_doc) != base


def test_load_errors_are_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="cannot read"):
        report_digest(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(BadRequest, match="not valid JSON"):
        report_digest(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(BadRequest, match="JSON object"):
        report_digest(listed)
