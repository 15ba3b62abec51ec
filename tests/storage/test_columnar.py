"""Parquet beside JSON Lines: same records back, bulk fast paths equal the plain ones."""

import json

import numpy as np
import pytest

from gates.records import PairRecord
from storage.columnar import read_parquet, write_parquet
from storage.files import read_pairs, write_pairs
from tests.storage.factories import make_record


def _uniform(n: int) -> list[PairRecord]:
    out = [make_record(i, label=[1, "cat", [0.5, 0.5]][i % 3], inputs=False) for i in range(n)]
    for i, r in enumerate(out):
        r.features = {"age": i, "country": "NL", "income": 1.5 * i}
    return out


def test_uniform_outputs_round_trip_through_the_matrix_path(tmp_path):
    records = _uniform(300)
    write_pairs(tmp_path / "p.parquet", records)
    back = list(read_parquet(tmp_path / "p.parquet"))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]
    # the matrix path: rows of one array, not 300 separate arrays
    assert back[1].champion.output.base is not None


def test_regression_scalars_round_trip(tmp_path):
    records = _uniform(10)
    for i, r in enumerate(records):
        r.champion.output = np.float64(i / 3)
        r.candidate.output = np.float64(i / 7)
        r.label = i / 5
    write_pairs(tmp_path / "p.parquet", records)
    back = list(read_pairs(tmp_path / "p.parquet"))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]
    assert back[3].champion.output.ndim == 0


def test_jsonl_chunk_fast_path_equals_line_by_line(tmp_path):
    records = _uniform(5000)  # more than one chunk
    path = tmp_path / "p.jsonl"
    write_pairs(path, records)
    lines = path.read_text().splitlines()
    plain = [PairRecord.from_dict(json.loads(line)) for line in lines]
    fast = list(read_pairs(path))
    assert [r.to_dict() for r in fast] == [r.to_dict() for r in plain]


def test_bad_output_inside_a_chunk_names_its_line(tmp_path):
    records = _uniform(50)
    path = tmp_path / "p.jsonl"
    write_pairs(path, records)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[20])
    bad["candidate"]["output"] = ["x", 1]
    lines[20] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:21: record.candidate.output"):
        list(read_pairs(path))


def test_a_foreign_parquet_file_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a mirrorgate pairs file"):
        list(read_pairs(tmp_path / "other.parquet"))


def test_empty_export_is_a_readable_file(tmp_path):
    assert write_parquet(tmp_path / "e.parquet", []) == 0
    assert list(read_pairs(tmp_path / "e.parquet")) == []


def test_lines_off_the_plain_shape_still_equal_from_dict(tmp_path):
    records = _uniform(40)
    path = tmp_path / "p.jsonl"
    write_pairs(path, records)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[1]["id"] = 12345  # int id: from_dict makes it a string
    lines[2]["ts"] = 1_764_050_000  # int ts
    lines[3]["slices"] = {"platform": 7}  # non-string slice value: stringified
    lines[4]["extra_field"] = "ignored"  # unknown key
    lines[5]["champion"] = None  # missing side: error "missing"
    lines[6]["candidate"]["latency_ms"] = 3  # int latency
    lines[7]["stage"] = None
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    fast = list(read_pairs(path))
    plain = [PairRecord.from_dict(json.loads(x)) for x in path.read_text().splitlines()]
    assert [r.to_dict() for r in fast] == [r.to_dict() for r in plain]
    assert fast[1].id == "12345" and fast[3].slices == {"platform": "7"}
    assert fast[5].champion.error == "missing"
