"""One contract, every gate class (river's ``checks`` style).

update returns None; merge equals the union; ``+=`` merges; state_dict is JSON and
round-trips; results carry every field the engine, the API and the docs rely on.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import pytest

from gates.base import Gate
from gates.contract import ContractGate
from gates.drift import InputDriftGate, OutputDriftGate
from gates.engine import GATE_CLASSES
from gates.latency import ErrorGate, LatencyGate
from gates.metric import MetricGate
from gates.pinned import PinnedGate
from gates.records import PairRecord
from gates.result import GateResult, Status
from gates.settings import GatesSettings
from gates.tolerance import ToleranceGate
from tests.gates.conftest import (
    assert_state_close,
    classification_records,
    regression_records,
)

SETTINGS = GatesSettings.model_validate(
    {
        "metric": {"clip": 20.0, "min_samples": 50},
        "slices": {"min_samples": 30},
        "tolerance": {"min_samples": 50},
        "drift": {"input": {"reference": "file", "reference_path": "unused"}},
    }
)
CLASSES: list[type[Gate]] = [
    ContractGate,
    ToleranceGate,
    MetricGate,
    OutputDriftGate,
    InputDriftGate,
    LatencyGate,
    ErrorGate,
    PinnedGate,
]
DATA: dict[str, Callable[[int, int], list[PairRecord]]] = {
    "classification": classification_records,
    "regression": regression_records,
}


def fresh(cls: type[Gate], reference: list[PairRecord]) -> Gate:
    gate = cls(SETTINGS, alpha=0.01)
    if isinstance(gate, InputDriftGate):
        gate.set_reference(reference)
    return gate


def feed(gate: Gate, records: list[PairRecord]) -> None:
    if isinstance(gate, PinnedGate):
        for r in records:
            if zlib.crc32(r.id.encode()) % 20 == 0:  # the same cases whatever the split
                gate.record(r.id, correct=zlib.crc32(r.id.encode()) % 7 != 0, ts=r.ts)
        return
    assert gate.update(records) is None


def test_every_engine_family_is_covered():
    assert set(GATE_CLASSES.values()) == set(CLASSES)


@pytest.mark.parametrize("task", sorted(DATA))
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_gate_contract(cls: type[Gate], task: str):
    records = DATA[task](800, 7)
    reference = DATA[task](300, 8)
    whole = fresh(cls, reference)
    feed(whole, records)
    a, b = fresh(cls, reference), fresh(cls, reference)
    feed(a, records[:350])
    feed(b, records[350:])
    a += b
    assert_state_close(a.state_dict(), whole.state_dict())

    blob = json.dumps(whole.state_dict(), allow_nan=False)
    back = type(whole).from_state(json.loads(blob), SETTINGS, alpha=0.01)
    assert_state_close(back.state_dict(), whole.state_dict())
    assert [r.to_dict() for r in back.results] == [r.to_dict() for r in whole.results]

    results = whole.results
    assert results, f"{cls.__name__} produced no results on {task} data"
    for r in results:
        assert isinstance(r, GateResult)
        d = r.to_dict()
        for key in (
            "name",
            "slice",
            "status",
            "statistic",
            "threshold",
            "n",
            "method",
            "confidence",
            "reason",
            "blocking",
            "lower",
            "upper",
        ):
            assert key in d
        assert d["status"] in ("PASS", "FAIL", "INCONCLUSIVE")
        assert r.reason and r.method.name and r.method.description
        assert r.name.startswith(whole.family.split(".")[0])
        json.dumps(d, allow_nan=False)
    assert whole.result.status in Status
    # results are a read-only view: mutating the returned list changes nothing
    results.clear()
    assert whole.results


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_merge_refuses_another_gate_type(cls: type[Gate]):
    gate = cls(SETTINGS, alpha=0.01)
    other_cls = ErrorGate if cls is not ErrorGate else LatencyGate
    with pytest.raises(TypeError):
        gate.merge(other_cls(SETTINGS, alpha=0.01))  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_state_refuses_another_family(cls: type[Gate]):
    other = (ErrorGate if cls is not ErrorGate else LatencyGate)(SETTINGS, alpha=0.01)
    with pytest.raises(ValueError):
        cls.from_state(other.state_dict(), SETTINGS, alpha=0.01)


def test_empty_update_changes_nothing():
    gate = ToleranceGate(SETTINGS, alpha=0.01)
    before = gate.state_dict()
    assert gate.update([]) is None
    assert gate.state_dict() == before
