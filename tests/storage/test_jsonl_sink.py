"""JsonlSink: non-blocking bounded submit, background writes, flush on close."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gates.records import ModelResult, PairRecord
from storage.jsonl_sink import JsonlSink
from storage.sink import PairSink


def _record(i: int) -> PairRecord:
    return PairRecord(
        id=f"r{i}",
        ts=1000.0 + i,
        champion=ModelResult(np.array([0.25, 0.75]), 1.5, None),
        candidate=ModelResult(None, 2.0, "timeout: slow"),
        slices={"platform": "web"},
        features={"age": 31},
        inputs_digest="ab" * 32,
    )


async def test_writes_every_accepted_record_and_drops_past_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.jsonl"
    sink = JsonlSink(path, buffer_size=5, flush_interval_s=3600)
    assert isinstance(sink, PairSink)
    await sink.start()
    accepted = [sink.submit(_record(i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3 and sink.dropped == 3
    await sink.flush()
    assert sink.submit(_record(8))  # room again after a write
    await sink.aclose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["id"] for d in lines] == ["r0", "r1", "r2", "r3", "r4", "r8"]
    back = PairRecord.from_dict(lines[0])
    assert back.candidate.error == "timeout: slow" and back.slices == {"platform": "web"}
    np.testing.assert_allclose(back.champion.output, [0.25, 0.75])
    assert sink.written == 6
