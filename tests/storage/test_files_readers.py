"""The JSONL readers: records and labels, with errors naming the file and line."""

from __future__ import annotations

import json

import pytest

from storage.files import read_labels, read_pairs

GOOD = {
    "id": "r-1",
    "ts": 1764050000.125,
    "slices": {"platform": "mobile"},
    "features": {"age": 31, "income": 52000.0},
    "champion": {"output": [0.1, 0.9], "latency_ms": 3.2, "error": None},
    "candidate": {"output": [0.2, 0.8], "latency_ms": 4.1, "error": None},
    "label": 1,
}


def test_reads_the_design_example_and_skips_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "r-2"}) + "\n")
    recs = list(read_pairs(path))
    assert [r.id for r in recs] == ["r-1", "r-2"]
    assert recs[0].to_dict()["champion"]["output"] == [0.1, 0.9]
    assert recs[0].slices == {"platform": "mobile"} and recs[0].label == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "x", "ts": "soon"}', "record.ts"),
        ('{"id": "", "ts": 1}', "record.id"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**GOOD, "champion": {"output": {"high": 1}}}), "record.champion.output"),
    ],
)
def test_bad_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        list(read_pairs(path))
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_labels_with_and_without_time(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "r-1", "label": 1, "ts": 5}\n{"id": 7, "label": 2.5}\n')
    assert list(read_labels(path)) == [("r-1", 1, 5.0), ("7", 2.5, None)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": 1}', "id"),
        ('{"id": "a"}', "label: missing"),
        ('{"id": "a", "label": {"x": 1}}', "label"),
        ('{"id": "a", "label": 1, "ts": "later"}', "ts"),
    ],
)
def test_bad_labels_name_the_line(tmp_path, line, message):
    path = tmp_path / "labels.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as err:
        list(read_labels(path))
    assert f"{path}:1:" in str(err.value) and message in str(err.value)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        list(read_pairs(tmp_path / "nope.jsonl"))
