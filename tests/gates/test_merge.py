"""Merge property (hypothesis): the state of a stream == the merge of its halves' states.

This is what lets several proxy replicas decide together: each keeps a gate state, and
their merge is the state one proxy would have built from all of the traffic.
"""

from __future__ import annotations

import zlib
from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from gates.engine import GATE_CLASSES, RolloutEngine
from gates.records import PairRecord
from gates.settings import GatesSettings, RolloutSettings
from tests.gates.conftest import assert_state_close, classification_records, regression_records

SETTINGS = GatesSettings.model_validate(
    {
        "metric": {"clip": 15.0},
        "drift": {"input": {"reference": "file", "reference_path": "ref.jsonl"}},
    }
)


@cache
def data(task: str, seed: int) -> tuple[PairRecord, ...]:
    make = classification_records if task == "classification" else regression_records
    return tuple(make(400, seed))


@cache
def reference(task: str) -> tuple[PairRecord, ...]:
    return data(task, 99)


def engine(task: str) -> RolloutEngine:
    eng = RolloutEngine(SETTINGS, RolloutSettings(), start_ts=0.0)
    eng.set_reference(list(reference(task)), now=0.0, who="test", why="fixed reference")
    return eng


def feed(eng: RolloutEngine, records: list[PairRecord]) -> None:
    for i in range(0, len(records), 37):  # uneven batches on purpose
        chunk = records[i : i + 37]
        eng.observe(chunk)
        eng.observe_labelled([r for r in chunk if r.label is not None])
    for r in records:
        if zlib.crc32(r.id.encode()) % 13 == 0:  # the same pinned cases however split
            eng.pinned_result(r.id, correct=r.ts % 2 < 1, now=r.ts)


@settings(max_examples=20, deadline=None)
@given(
    task=st.sampled_from(["classification", "regression"]),
    seed=st.integers(0, 3),
    n=st.integers(0, 400),
    cut=st.floats(0, 1),
)
def test_state_of_a_stream_is_the_merge_of_its_halves(task, seed, n, cut):
    records = list(data(task, seed)[:n])
    k = int(cut * len(records))
    whole, left, right = engine(task), engine(task), engine(task)
    feed(whole, records)
    feed(left, records[:k])
    feed(right, records[k:])
    left.merge(right)
    for fam in GATE_CLASSES:
        assert_state_close(left.gates[fam].state_dict(), whole.gates[fam].state_dict(), path=fam)
        assert [r.status for r in left.gates[fam].results] == [
            r.status for r in whole.gates[fam].results
        ]
    assert (left.pairs, left.labels) == (whole.pairs, whole.labels)
