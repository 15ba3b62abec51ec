"""Capture policy: all | failures | never, on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np

from gates.records import ModelResult, PairRecord
from storage.capture import _SMALL, CaptureCache, _top, default_failure_rule
from storage.codec import inputs_digest
from storage.recorder import SqlRecorder
from tests.storage.factories import eventually, make_record
from tests.storage.test_recorder import settings


def stored_inputs(store, rid):
    return store.get_pairs(rid, with_inputs=True)[0].inputs


async def test_never_keeps_only_the_digest(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), capture="never"))
    await rec.start()
    record = make_record(0, agree=False)
    rec.submit(record)
    await rec.aclose()
    [stored] = store.get_pairs("req-0", with_inputs=True)
    assert stored.inputs is None
    assert record.inputs is not None
    assert stored.inputs_digest == inputs_digest(record.inputs)
    assert store.count_pairs(rollout.id, with_inputs=True) == 0


async def test_all_stores_every_input(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), capture="all"))
    await rec.start()
    for i in range(4):
        rec.submit(make_record(i))
    await rec.aclose()
    assert store.count_pairs(rollout.id, with_inputs=True) == 4


async def test_failures_stores_inputs_only_when_the_pair_fails(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), capture="failures"))
    await rec.start()
    agree, disagree = make_record(0, agree=True), make_record(1, agree=False)
    errored = make_record(2)
    errored.candidate = ModelResult(output=None, latency_ms=None, error="timeout")
    later_wrong, later_marked = make_record(3), make_record(4)
    for r in (agree, disagree, errored, later_wrong, later_marked):
        rec.submit(r)
    assert await rec.flush(timeout_s=60)
    # Failures known at submit (disagreement, an error) are stored at once.
    assert stored_inputs(store, "req-0") is None
    assert stored_inputs(store, "req-1") is not None
    assert stored_inputs(store, "req-2") is not None
    assert stored_inputs(store, "req-3") is None
    assert rec.inputs_for("req-3") is not None  # held, waiting for a verdict

    # A label that both models got wrong makes req-3 a failure when it joins.
    assert later_wrong.champion.output is not None
    wrong = int(1 - np.argmax(later_wrong.champion.output))
    rec.submit_label("req-3", wrong)
    await eventually(lambda: stored_inputs(store, "req-3") is not None, what="label capture")
    # A right label does not.
    right = int(np.argmax(agree.champion.output))  # type: ignore[arg-type]
    rec.submit_label("req-0", right)
    assert await rec.flush(timeout_s=60)
    assert stored_inputs(store, "req-0") is None

    # The harvest step can decide on its own.
    assert rec.mark_failure("req-4") is True
    assert rec.mark_failure("req-4") is False  # taken once
    assert await rec.flush(timeout_s=60)
    back = stored_inputs(store, "req-4")
    assert later_marked.inputs is not None and back is not None
    np.testing.assert_array_equal(back["x"], later_marked.inputs["x"])
    await rec.aclose()


def test_cache_is_bounded_by_count_and_bytes():
    x = {"x": np.zeros(100, dtype=np.uint8)}
    cache = CaptureCache(max_entries=3, max_bytes=250)
    for i in range(5):
        cache.put(str(i), x)
    assert len(cache) == 2 and cache.nbytes == 200  # bytes bound the count here
    assert cache.get("0") is None and cache.get("4") is not None
    cache = CaptureCache(max_entries=2, max_bytes=10_000)
    for i in range(5):
        cache.put(str(i), x)
    assert len(cache) == 2 and cache.evicted == 3
    assert cache.take("4") is x and cache.take("4") is None
    CaptureCache(max_entries=5, max_bytes=50).put("big", x)  # larger than the bound: ignored


def test_default_failure_rule():
    def rec(a, b, label=None, error=None):
        return PairRecord(
            id="x",
            ts=0.0,
            champion=ModelResult(output=np.array(a)),
            candidate=ModelResult(output=None if error else np.array(b), error=error),
            label=label,
        )

    assert not default_failure_rule(rec([0.2, 0.8], [0.3, 0.7]))
    assert default_failure_rule(rec([0.2, 0.8], [0.7, 0.3]))
    assert default_failure_rule(rec([0.2, 0.8], [0.3, 0.7], label=0))
    assert not default_failure_rule(rec([0.2, 0.8], [0.3, 0.7], label=1))
    assert default_failure_rule(rec([0.2, 0.8], None, error="boom"))
    assert not default_failure_rule(rec(1.5, 2.5))  # regression: the gates' call


def test_the_top_class_is_numpys_argmax_for_small_and_large_outputs():
    # The rule finds the top class in Python for short outputs (ndarray.argmax releases
    # the GIL per call): numpy is the oracle, ties (first wins), NaN (the first NaN
    # wins), infinities, signed zeros, integers and booleans included.
    rng = np.random.default_rng(11)
    kinds = (np.float64, np.float32, np.float16, np.int64, np.uint8, np.bool_)
    for size in (2, 3, 10, _SMALL, _SMALL + 1, 200):
        for dtype in kinds:
            for _ in range(40):
                if dtype is np.bool_:
                    a = rng.integers(0, 2, size).astype(bool)
                else:
                    a = (rng.normal(size=size) * 2).round().astype(dtype)
                    if a.dtype.kind == "f" and rng.random() < 0.5:
                        a[rng.integers(0, size)] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
                assert _top(a) == int(np.argmax(a)), a
    assert _top(np.array([0.5])) is None and _top(np.zeros((2, 2))) is None
    assert _top(np.array(["a", "b"])) is None and _top(None) is None
