"""Slice values admitted by traffic (gates/cells.py): a late value with real traffic gets a
cell of its own past ``max_values``, predictably, independent of batching, mergeable."""

from __future__ import annotations

import numpy as np
import pytest

from gates.batch import PairBatch
from gates.cells import OTHER, SliceCells
from gates.engine import RolloutEngine
from gates.result import Status
from gates.settings import GatesSettings, SliceSettings
from tests.gates.conftest import plan

VALUES = [f"v{i:02d}" for i in range(100)]
LATE = "v99"


def region_codes(rng: np.random.Generator, n: int, start: int) -> np.ndarray:
    """99 values share 95% of the traffic from the start; v99 arrives at pair 3000 with 5%."""
    pos = start + np.arange(n)
    late = (pos >= 3000) & (rng.random(n) < 0.05)
    return np.where(late, 99, rng.integers(0, 99, size=n))


def labelled(rng: np.random.Generator, n: int, start: int, drop: float) -> PairBatch:
    region = region_codes(rng, n, start)
    y = rng.integers(0, 3, size=n)
    champ_ok = rng.random(n) < 0.9
    cand_ok = champ_ok & ~((region == 99) & (rng.random(n) < drop / 0.9))
    wrong = (y + 1) % 3
    eye = np.eye(3) * 0.7 + 0.1  # rows sum to 1: class probabilities
    return PairBatch.from_arrays(
        champion=eye[np.where(champ_ok, y, wrong)],
        candidate=eye[np.where(cand_ok, y, wrong)],
        ts=(start + np.arange(n)).astype(float),
        labels=y,
        slices={"region": (VALUES, region.astype(np.int64))},
    )


def run(settings: GatesSettings, seed: int, drop: float = 0.3, pairs: int = 40_000):
    rng = np.random.default_rng(seed)
    eng = RolloutEngine(settings, plan({"name": "shadow"}), start_ts=0.0)
    for start in range(0, pairs, 500):
        eng.observe_labelled(labelled(rng, 500, start, drop))
        ev = eng.evaluate(float(start))
        if ev.verdict == "abort":
            return eng, ev
    return eng, ev


def test_a_late_regressed_value_of_a_100_value_key_is_named_not_other():
    # v99 arrives after every other value has appeared (32 named, the rest in __other__)
    for seed in range(3):
        eng, ev = run(GatesSettings(), seed)
        assert ev.verdict == "abort", ev.reason
        failing = [g.label for g in ev.gates if g.blocking and g.status is Status.FAIL]
        assert f"metric.accuracy[region={LATE}]" in failing
        assert f"metric.accuracy[region={OTHER}]" not in failing
        assert "region=v99" in ev.reason
        cells = eng.gates["metric"].cells
        assert len(cells.values["region"]) == 33  # 32 by appearance + v99 by traffic
        assert cells.values["region"][-1] == LATE
        # the rare values were never admitted: each stays below 2% of the key's traffic
        assert all(c < 0.02 * cells.key_n["region"] for c in cells.pending["region"].values())


def test_without_admission_by_traffic_the_late_value_is_folded_into_other():
    # the same streams with the feature off: v99 has no cell, so no abort can name it
    off = GatesSettings.model_validate({"slices": {"max_admitted": 0}})
    eng, ev = run(off, 0)
    cells = eng.gates["metric"].cells
    assert LATE not in cells.values["region"]
    assert all("v99" not in g.slice for g in ev.gates)


def test_admission_happens_at_the_row_the_rule_is_met_whatever_the_batches():
    s = SliceSettings(max_values=2, admit_min=5, admit_share=0.2)
    names = ["a", "b", "c", "d"]
    codes = np.array([0, 1, 2, 3, 3, 2, 3, 3, 3, 2, 3, 0, 3, 2, 2, 3, 2, 2, 2, 1], dtype=np.int64)
    n = len(codes)

    def cells_of(cuts: list[int]) -> tuple[SliceCells, list[str]]:
        cells = SliceCells(s)
        per_row: list[str] = []
        for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
            b = PairBatch.from_arrays(
                champion=np.zeros((hi - lo, 2)),
                candidate=np.zeros((hi - lo, 2)),
                ts=np.arange(lo, hi, dtype=float),
                slices={"k": (names, codes[lo:hi])},
            )
            ((cell_names, local),) = cells.assign(b, np.ones(hi - lo, dtype=bool))
            per_row.extend(cell_names[i] for i in local)
        return cells, per_row

    whole, rows = cells_of([])
    # d reaches 5 rows (>= 0.2 of the key's 9 rows) at row 8; c reaches 5 at row 14
    assert rows[:8] == ["k=a", "k=b", *["k=__other__"] * 6]
    assert rows[8] == "k=d" and rows[13] == "k=__other__" and rows[14] == "k=c"
    assert rows[15:] == ["k=d", "k=c", "k=c", "k=c", "k=b"]
    assert list(whole.order) == ["k=a", "k=b", "k=__other__", "k=d", "k=c"]
    for cuts in ([3], [8, 9], [1, 5, 14, 15], list(range(1, n))):
        cells, got = cells_of(cuts)
        assert got == rows and cells.state() == whole.state()


def test_waiting_counts_merge_and_admit_on_the_sum():
    s = SliceSettings(max_values=1, admit_min=4, admit_share=0.3)

    def fed(codes: list[int]) -> SliceCells:
        cells = SliceCells(s)
        c = np.array(codes, dtype=np.int64)
        b = PairBatch.from_arrays(
            champion=np.zeros((len(c), 2)),
            candidate=np.zeros((len(c), 2)),
            ts=np.arange(len(c), dtype=float),
            slices={"k": (["a", "b"], c)},
        )
        cells.assign(b, np.ones(len(c), dtype=bool))
        return cells

    left, right = fed([0, 1, 1, 0]), fed([0, 1, 1, 0])
    assert left.values["k"] == ["a"] and left.pending["k"] == {"b": 2}
    left.merge(right)
    # b: 4 rows of 8 in all, both rules met by the sum: a cell of its own from now on
    assert left.values["k"] == ["a", "b"] and left.pending["k"] == {}
    assert left.key_n["k"] == 8 and list(left.order) == ["k=a", "k=__other__", "k=b"]
    restored = SliceCells(s)
    restored.load(left.state())
    assert restored.state() == left.state()


def test_tracked_values_stay_bounded():
    s = SliceSettings(max_values=1, max_tracked=8, admit_min=10**6)
    cells = SliceCells(s)
    names = [f"u{i}" for i in range(500)]
    codes = np.concatenate([np.arange(500), np.full(50, 7)]).astype(np.int64)
    b = PairBatch.from_arrays(
        champion=np.zeros((550, 2)),
        candidate=np.zeros((550, 2)),
        ts=np.arange(550, dtype=float),
        slices={"k": (names, codes)},
    )
    cells.assign(b, np.ones(550, dtype=bool))
    assert len(cells.pending["k"]) <= 8
    assert cells.pending["k"].get("u7") == 51  # the value with traffic survives pruning


@pytest.mark.parametrize("field", ["admit_share", "admit_min", "max_tracked"])
def test_bad_admission_settings_are_refused(field):
    with pytest.raises(ValueError, match=field):
        SliceSettings.model_validate({field: 0})
