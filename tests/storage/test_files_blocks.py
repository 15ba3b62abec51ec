"""``read_pair_blocks``: replay's column reader gives the records ``read_pairs`` gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gates.columns import PairColumns
from gates.records import PairRecord
from gates.simulate import Scenario, records
from storage.files import _CHUNK, read_pair_blocks, read_pairs


def flatten(blocks) -> list[PairRecord]:
    out: list[PairRecord] = []
    for b in blocks:
        out.extend(b.records() if isinstance(b, PairColumns) else b)
    return out


def key(r: PairRecord) -> tuple:
    def side(m):
        out = None if m.output is None else (m.output.shape, m.output.tolist())
        return (out, m.latency_ms, m.error, m.name, m.datatype, m.shape)

    return (r.id, r.ts, r.slices, r.features, r.label, side(r.champion), side(r.candidate))


def write_lines(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_blocks_are_the_records_of_the_file(tmp_path):
    recs = records(Scenario.aa(candidate_error_rate=0.02), _CHUNK + 900, seed=4)
    docs = [r.to_dict() for r in recs]
    for i, d in enumerate(docs):
        if i % 11 == 0:
            d["champion"].update(output_name="probs", datatype="FP32", shape=[3])
        if i % 13 == 0:
            d["candidate"]["output"] = 0.5  # a number, not a list: its own block
        if i == 17:
            d["ts"] = int(d["ts"])  # an integer time is a time
        if i == 29:
            d["candidate"]["output"] = ["yes", "no", "maybe"]  # BYTES: a record
        if i == 31:
            d["slices"] = {"platform": 3}  # not a string: the record parser's business
    path = write_lines(tmp_path / "p.jsonl", docs)
    path.write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines are skipped
    blocks = list(read_pair_blocks(path))
    assert [key(r) for r in flatten(blocks)] == [key(r) for r in read_pairs(path)]
    cols = [b for b in blocks if isinstance(b, PairColumns)]
    assert sum(c.n for c in cols) > 0.8 * len(docs)  # most lines never become records
    assert {c.signature()[0] for c in cols} == {(3,)}
    assert all(np.isfinite(c.champion).all() for c in cols)


def test_a_bad_line_is_named_when_reading_gets_there(tmp_path):
    docs = [r.to_dict() for r in records(Scenario.aa(), 50, seed=5)]
    docs[40]["ts"] = "soon"
    path = write_lines(tmp_path / "p.jsonl", docs)
    with pytest.raises(ValueError, match=rf"{path}:41: .*ts"):
        list(read_pair_blocks(path))
    docs[40]["ts"] = 1.0
    docs[40]["champion"]["output"] = [[0.1, 0.9], [0.2, 0.8]]  # nested: not a flat list
    path = write_lines(tmp_path / "q.jsonl", docs)
    with pytest.raises(ValueError, match=rf"{path}:41: .*output"):
        list(read_pair_blocks(path))


@pytest.mark.parametrize("described", [False, True])
def test_a_uniform_file_is_read_a_whole_chunk_at_a_time(tmp_path, described):
    # every line in the exporter's shape: each chunk is judged column-wise as one block
    docs = [r.to_dict() for r in records(Scenario.aa(), 2000, seed=6)]
    for i, d in enumerate(docs):
        d["features"]["visits"] = i % 9  # an integer feature
        if described:
            d["champion"].update(output_name="probs", datatype="FP32", shape=[3])
            d["candidate"].update(output_name="probs", datatype="FP64", shape=[3])
        if i % 5 == 0:
            d["served_by"] = "candidate"
    path = write_lines(tmp_path / "u.jsonl", docs)
    blocks = list(read_pair_blocks(path))
    assert len(blocks) > 1 and all(isinstance(b, PairColumns) for b in blocks)
    assert [key(r) for r in flatten(blocks)] == [key(r) for r in read_pairs(path)]
    want = ("probs", "FP64", (3,)) if described else (None, None, None)
    assert {b.candidate_desc for b in blocks} == {want}
