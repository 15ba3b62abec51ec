import gzip
import json

import numpy as np
import pytest

from gates.records import PairRecord
from storage.files import read_labels, read_pairs, write_pairs
from tests.storage.factories import make_record


def _records() -> list[PairRecord]:
    out = [make_record(i, label=i % 2, inputs=False) for i in range(5)]
    out[1].candidate.error = "timeout"
    out[1].candidate.output = None
    out[2].label = None
    out[3].stage = "canary-10"
    out[3].served_by = "candidate"
    out[4].inputs_digest = "abc123"
    out[4].champion.output = np.float64(2.5)  # a regression-style scalar
    return out


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.parquet"])
def test_write_then_read_preserves_every_field(tmp_path, name):
    path = tmp_path / name
    records = _records()
    assert write_pairs(path, records) == len(records)
    back = list(read_pairs(path))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]


def test_bad_line_names_its_number(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(_records()[0].to_dict())
    path.write_text(good + "\n\n" + good.replace('"ts": ', '"ts": "x", "old": ') + "\n")
    it = read_pairs(path)
    next(it)
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: record.ts"):
        next(it)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        list(read_pairs(path))


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        list(read_pairs(tmp_path / "nope.jsonl"))


def test_read_labels(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"id": "r-1", "label": 1, "ts": 5.5}\n{"id": 7, "label": "cat"}\n'
        '{"id": "r-3", "label": [0.5, 1.5]}\n'
    )
    assert list(read_labels(path)) == [
        ("r-1", 1, 5.5),
        ("7", "cat", None),
        ("r-3", [0.5, 1.5], None),
    ]
    for bad, what in [
        ('{"label": 1}', "id"),
        ('{"id": "a"}', "label: missing"),
        ('{"id": "a", "label": true}', "label"),
        ('{"id": "a", "label": 1, "ts": "now"}', "ts"),
        ("[1]", "expected a JSON object"),
    ]:
        path.write_text('{"id": "ok", "label": 0}\n' + bad + "\n")
        with pytest.raises(ValueError, match=rf"labels.jsonl:2: .*{what}"):
            list(read_labels(path))


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.jsonl"

    def broken():
        yield _records()[0]
        raise RuntimeError("database went away")

    with pytest.raises(RuntimeError):
        write_pairs(path, broken())
    assert list(tmp_path.iterdir()) == []


def test_gzip_output_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_pairs(a, _records())
    write_pairs(b, _records())
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()).count(b"\n") == 5
