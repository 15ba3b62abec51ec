"""BatchingBackend over a real onnxruntime model, with every runtime call counted.

Batches are made deterministic without clocks: the counting wrapper holds the first
call until the test releases it, so later requests pile up behind a busy model exactly
as they would under load, and the test knows which batches must form. Those tests use
``max_batch_delay_ms: 0`` (whatever is queued runs as soon as the model is free) or a
delay no test waits out (only a full queue, or draining, may run it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from proxy.backends.batching import BATCH_SIZE_METRIC, BatchingBackend
from proxy.backends.onnx import OnnxBackend
from proxy.core.config import BackendSettings, BatchingSettings
from proxy.core.errors import BadRequest, MirrorgateError, NotReady
from tests.proxy import models
from tests.proxy.backends.conftest import CountingBackend

pytestmark = pytest.mark.timeout(60)  # a batching bug shows up as a hang

FOREVER_MS = 3_600_000.0  # a delay no test waits out: batches must form by size or drain


@dataclass
class Rig:
    batcher: BatchingBackend
    counter: CountingBackend
    weights: models.ClassifierWeights
    registry: CollectorRegistry

    def metric(self, suffix: str) -> float | None:
        name = f"{BATCH_SIZE_METRIC}_{suffix}"
        model = self.batcher.metadata.name
        return self.registry.get_sample_value(name, {"model": model})


async def _onnx(path: Path) -> OnnxBackend:
    return await OnnxBackend.create(BackendSettings(name="clf", kind="onnx", path=str(path)))


@pytest.fixture(scope="module")
def classifier_file(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, models.ClassifierWeights]:
    path = tmp_path_factory.mktemp("batching") / "clf.onnx"
    return path, models.build_onnx_classifier(path, 4, 3, seed=21)


async def _rig(
    classifier_file: tuple[Path, models.ClassifierWeights],
    *,
    max_batch_size: int = 8,
    delay_ms: float = 0.0,
    slots: int = 1,
    hold: bool = True,
) -> Rig:
    path, weights = classifier_file
    counter = CountingBackend(await _onnx(path), hold=hold)
    registry = CollectorRegistry()
    batcher = BatchingBackend(
        counter,
        BatchingSettings(max_batch_size=max_batch_size, max_batch_delay_ms=delay_ms),
        registry,
        max_concurrent_batches=slots,
    )
    return Rig(batcher, counter, weights, registry)


@pytest.fixture
async def rig(classifier_file: tuple[Path, models.ClassifierWeights]) -> AsyncIterator[Rig]:
    r = await _rig(classifier_file)
    yield r
    r.counter.release.set()
    await r.batcher.aclose()


async def _occupy(rig: Rig) -> tuple[asyncio.Task[dict[str, np.ndarray]], np.ndarray]:
    """Fill the batcher's only slot with a full-size call that waits for release."""
    x = rig.weights.sample(rig.batcher._max_rows, seed=999)
    first = asyncio.create_task(rig.batcher.infer({"x": x}))
    await rig.counter.entered.wait()
    return first, x


async def _settle() -> None:
    for _ in range(5):  # let created tasks reach their await on the batcher
        await asyncio.sleep(0)


def _check(weights: models.ClassifierWeights, x: np.ndarray, out: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(out["probs"], weights.probs(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["label"], weights.labels(x))


async def test_requests_queued_behind_a_busy_model_run_as_one_batch(rig: Rig) -> None:
    first, x0 = await _occupy(rig)
    xs = [rig.weights.sample(1 + i % 2, seed=i) for i in range(5)]  # 1,2,1,2,1 rows
    tasks = [asyncio.create_task(rig.batcher.infer({"x": x})) for x in xs]
    await _settle()
    assert rig.counter.rows == [8]  # nothing else ran while the model was busy
    rig.counter.release.set()
    outs = await asyncio.gather(*tasks)
    _check(rig.weights, x0, await first)
    assert rig.counter.rows == [8, 7]
    for x, out in zip(xs, outs, strict=True):
        assert out["probs"].shape == (x.shape[0], 3)
        _check(rig.weights, x, out)
    assert rig.metric("count") == 2
    assert rig.metric("sum") == 15


async def test_batched_results_equal_unbatched_calls(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    plain = await _onnx(path)
    r = await _rig(classifier_file, max_batch_size=16, delay_ms=2.0, slots=2, hold=False)
    try:
        xs = [weights.sample(1 + i % 4, seed=50 + i) for i in range(40)]
        batched = await asyncio.gather(*(r.batcher.infer({"x": x}) for x in xs))
        for x, got in zip(xs, batched, strict=True):
            want = await plain.infer({"x": x})
            np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(got["label"], want["label"])
        assert sum(r.counter.rows) == sum(x.shape[0] for x in xs)
        assert len(r.counter.calls) < len(xs)  # 40 concurrent requests: some were stacked
    finally:
        await plain.aclose()
        await r.batcher.aclose()


async def test_batches_never_exceed_max_batch_size(rig: Rig) -> None:
    first, _ = await _occupy(rig)
    xs = [rig.weights.sample(3, seed=i) for i in range(6)]  # 18 rows; 3+3 <= 8 < 3+3+3
    tasks = [asyncio.create_task(rig.batcher.infer({"x": x})) for x in xs]
    await _settle()
    rig.counter.release.set()
    outs = await asyncio.gather(first, *tasks)
    assert rig.counter.rows == [8, 6, 6, 6]
    for x, out in zip(xs, outs[1:], strict=True):
        _check(rig.weights, x, out)


async def test_a_full_queue_runs_without_waiting_for_the_delay(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    r = await _rig(classifier_file, max_batch_size=3, delay_ms=FOREVER_MS, hold=False)
    try:
        xs = [r.weights.sample(1, seed=i) for i in range(3)]
        outs = await asyncio.gather(*(r.batcher.infer({"x": x}) for x in xs))
        assert r.counter.rows == [3]
        for x, out in zip(xs, outs, strict=True):
            _check(r.weights, x, out)
    finally:
        await r.batcher.aclose()


async def test_a_lone_request_runs_when_the_delay_expires(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    r = await _rig(classifier_file, max_batch_size=64, delay_ms=5.0, hold=False)
    try:
        x = r.weights.sample(2)
        _check(r.weights, x, await r.batcher.infer({"x": x}))
        assert r.counter.rows == [2]
    finally:
        await r.batcher.aclose()


async def test_different_shapes_and_dtypes_are_never_stacked(rig: Rig) -> None:
    first, _ = await _occupy(rig)
    good = [rig.weights.sample(1, seed=i) for i in range(3)]
    wide = np.zeros((1, 5), np.float32)  # wrong feature count
    ints = np.arange(4, dtype=np.int64).reshape(1, 4)  # another dtype, castable exactly
    tasks = [asyncio.create_task(rig.batcher.infer({"x": x})) for x in [*good, wide, ints]]
    await _settle()
    rig.counter.release.set()
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for call in rig.counter.calls:  # every runtime call saw one kind of tensor only
        assert call["x"][1:] in ((4,), (5,))
    assert sorted(rig.counter.rows[1:]) == [1, 1, 3]
    for x, out in zip(good, results[:3], strict=True):
        assert isinstance(out, dict)
        _check(rig.weights, x, out)
    assert isinstance(results[3], BadRequest)
    assert isinstance(results[4], dict)
    _check(rig.weights, ints.astype(np.float32), results[4])


async def test_a_request_with_bad_values_fails_alone(rig: Rig) -> None:
    """Same shape and dtype (so stacked), but one request's INT64 values have no exact
    FP32 form: the stacked call fails, members re-run alone, only that one fails."""
    first, _ = await _occupy(rig)
    good = [np.arange(4, dtype=np.int64).reshape(1, 4) + i for i in range(4)]
    bad = np.full((1, 4), 2**40 + 1, np.int64)
    inputs = [good[0], good[1], bad, good[2], good[3]]
    tasks = [asyncio.create_task(rig.batcher.infer({"x": x})) for x in inputs]
    await _settle()
    rig.counter.release.set()
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert rig.counter.rows == [8, 5, 1, 1, 1, 1, 1]
    assert isinstance(results[2], BadRequest)
    for x, out in zip(inputs, results, strict=True):
        if x is not bad:
            assert isinstance(out, dict)
            _check(rig.weights, x.astype(np.float32), out)


async def test_a_runtime_fault_of_one_request_fails_alone(tmp_path: Path) -> None:
    """The runtime itself rejects one member (an id past the table): the others succeed."""
    path = tmp_path / "lookup.onnx"
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    models.build_onnx_lookup(path, table)
    counter = CountingBackend(await _onnx(path), hold=True)
    batcher = BatchingBackend(
        counter,
        BatchingSettings(max_batch_size=4, max_batch_delay_ms=0.0),
        None,
        max_concurrent_batches=1,
    )
    try:
        first = asyncio.create_task(batcher.infer({"ids": np.array([[0]] * 4)}))
        await counter.entered.wait()
        ids = [np.array([[1]]), np.array([[60]]), np.array([[5]])]
        tasks = [asyncio.create_task(batcher.infer({"ids": i})) for i in ids]
        await _settle()
        counter.release.set()
        await first
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert counter.rows == [4, 3, 1, 1, 1]
        assert isinstance(results[1], MirrorgateError)
        assert "out of data bounds" in str(results[1])
        for i in (0, 2):
            out = results[i]
            assert isinstance(out, dict)
            np.testing.assert_array_equal(out["rows"][0, 0], table[ids[i][0, 0]])
    finally:
        counter.release.set()
        await batcher.aclose()


async def test_requests_asking_for_different_outputs_are_not_stacked(rig: Rig) -> None:
    first, _ = await _occupy(rig)
    x1, x2 = rig.weights.sample(1, seed=1), rig.weights.sample(1, seed=2)
    t1 = asyncio.create_task(rig.batcher.infer({"x": x1}, outputs=["label"]))
    t2 = asyncio.create_task(rig.batcher.infer({"x": x2}))
    await _settle()
    rig.counter.release.set()
    await first
    o1, o2 = await asyncio.gather(t1, t2)
    assert list(o1) == ["label"] and sorted(o2) == ["label", "probs"]
    assert rig.counter.rows == [8, 1, 1]


async def test_a_cancelled_caller_leaves_the_batch(rig: Rig) -> None:
    first, _ = await _occupy(rig)
    xs = [rig.weights.sample(1, seed=i) for i in range(3)]
    tasks = [asyncio.create_task(rig.batcher.infer({"x": x})) for x in xs]
    await _settle()
    tasks[1].cancel()
    await _settle()
    rig.counter.release.set()
    await first
    _check(rig.weights, xs[0], await tasks[0])
    _check(rig.weights, xs[2], await tasks[2])
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert rig.counter.rows == [8, 2]


async def test_oversized_and_unbatchable_requests_go_straight_through(rig: Rig) -> None:
    rig.counter.hold = False
    big = rig.weights.sample(20)
    _check(rig.weights, big, await rig.batcher.infer({"x": big}))
    with pytest.raises(BadRequest):  # a scalar has no batch axis: the runtime judges it
        await rig.batcher.infer({"x": np.float32(1.0)})  # type: ignore[dict-item]
    assert [c["x"] for c in rig.counter.calls] == [(20, 4), ()]


async def test_close_runs_what_is_queued_then_refuses(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    r = await _rig(classifier_file, delay_ms=FOREVER_MS, hold=False)  # only draining runs them
    xs = [r.weights.sample(1, seed=i) for i in range(3)]
    tasks = [asyncio.create_task(r.batcher.infer({"x": x})) for x in xs]
    await _settle()
    assert r.counter.calls == []
    await r.batcher.aclose()
    for x, task in zip(xs, tasks, strict=True):
        _check(r.weights, x, task.result())
    assert r.counter.rows == [3]
    with pytest.raises(NotReady):
        await r.batcher.infer({"x": xs[0]})


async def test_a_fixed_batch_dimension_turns_batching_off(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    models.build_onnx_fixed_batch(path, 3)
    counter = CountingBackend(await _onnx(path))
    batcher = BatchingBackend(counter, BatchingSettings(max_batch_size=8), None)
    try:
        xs = [np.full((1, 3), i, np.float32) for i in range(4)]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        assert counter.rows == [1, 1, 1, 1]
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out["y"], x)
    finally:
        await batcher.aclose()


async def test_a_model_that_mixes_rows_stops_being_batched(tmp_path: Path) -> None:
    path = tmp_path / "sum.onnx"
    models.build_onnx_batch_sum(path, 3)
    counter = CountingBackend(await _onnx(path), hold=True)
    batcher = BatchingBackend(
        counter,
        BatchingSettings(max_batch_size=4, max_batch_delay_ms=0.0),
        None,
        max_concurrent_batches=1,
    )
    try:
        first = asyncio.create_task(batcher.infer({"x": np.ones((4, 3), np.float32)}))
        await counter.entered.wait()
        xs = [np.full((1, 3), i + 1, np.float32) for i in range(2)]
        tasks = [asyncio.create_task(batcher.infer({"x": x})) for x in xs]
        await _settle()
        counter.release.set()
        np.testing.assert_array_equal((await first)["total"], [4, 4, 4])
        outs = await asyncio.gather(*tasks)
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out["total"], x[0])  # each request's own sum
        assert counter.rows == [4, 2, 1, 1]
        more = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        assert counter.rows[4:] == [1, 1]  # switched off: no more stacking
        assert [float(o["total"][0]) for o in more] == [1.0, 2.0]
    finally:
        await batcher.aclose()


async def test_champion_and_candidate_share_one_histogram(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    registry = CollectorRegistry()
    settings = BatchingSettings(max_batch_size=4, max_batch_delay_ms=1.0)
    a = BatchingBackend(
        await OnnxBackend.create(BackendSettings(name="champ", kind="onnx", path=str(path))),
        settings,
        registry,
    )
    b = BatchingBackend(
        await OnnxBackend.create(BackendSettings(name="cand", kind="onnx", path=str(path))),
        settings,
        registry,
    )
    try:
        x = weights.sample(2)
        await a.infer({"x": x})
        await b.infer({"x": x})
        await b.infer({"x": x})
        count = f"{BATCH_SIZE_METRIC}_count"
        assert registry.get_sample_value(count, {"model": "champ"}) == 1
        assert registry.get_sample_value(count, {"model": "cand"}) == 2
        assert b.identity.extra["max_batch_size"] == "4"
        assert b.identity.digest == a.identity.digest
    finally:
        await a.aclose()
        await b.aclose()


# -- the batcher's own threads: an OnnxBackend inner (run_sync), no counting wrapper --
# Batches are made deterministic by size: a delay no test waits out, and exactly
# max_batch_size rows submitted, so the batch runs when the last one arrives.


async def _direct(path: Path, max_batch_size: int) -> BatchingBackend:
    batcher = BatchingBackend(
        await _onnx(path),
        BatchingSettings(max_batch_size=max_batch_size, max_batch_delay_ms=FOREVER_MS),
        None,
    )
    assert callable(getattr(batcher.inner, "run_sync", None))  # the direct path runs
    return batcher


async def test_direct_path_stacks_a_full_batch_and_splits_it(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    batcher = await _direct(path, 6)
    try:
        xs = [weights.sample(1 + i % 2, seed=70 + i) for i in range(4)]  # 1+2+1+2 rows
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        assert (batcher.calls, batcher.rows) == (1, 6)
        for x, out in zip(xs, outs, strict=True):
            _check(weights, x, out)
    finally:
        await batcher.aclose()


async def test_direct_path_a_request_with_bad_values_fails_alone(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    batcher = await _direct(path, 4)
    try:
        good = [np.arange(4, dtype=np.int64).reshape(1, 4) + i for i in range(3)]
        bad = np.full((1, 4), 2**40 + 1, np.int64)
        inputs = [good[0], bad, good[1], good[2]]
        results = await asyncio.gather(
            *(batcher.infer({"x": x}) for x in inputs), return_exceptions=True
        )
        assert (batcher.calls, batcher.rows) == (5, 8)  # one stacked call, then 4 alone
        assert isinstance(results[1], BadRequest)
        for x, out in zip(inputs, results, strict=True):
            if x is not bad:
                assert isinstance(out, dict)
                _check(weights, x.astype(np.float32), out)
    finally:
        await batcher.aclose()


async def test_direct_path_a_cancelled_caller_leaves_the_batch(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    batcher = await _direct(path, 4)
    try:
        xs = [weights.sample(1, seed=80 + i) for i in range(4)]
        tasks = [asyncio.create_task(batcher.infer({"x": x})) for x in xs[:3]]
        await _settle()
        tasks[1].cancel()
        await _settle()
        tasks.append(asyncio.create_task(batcher.infer({"x": xs[3]})))  # fills the batch
        for i in (0, 2, 3):
            _check(weights, xs[i], await tasks[i])
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert (batcher.calls, batcher.rows) == (1, 3)
    finally:
        await batcher.aclose()


async def test_direct_path_close_drains_then_refuses(
    classifier_file: tuple[Path, models.ClassifierWeights],
) -> None:
    path, weights = classifier_file
    batcher = await _direct(path, 8)
    xs = [weights.sample(1, seed=90 + i) for i in range(3)]
    tasks = [asyncio.create_task(batcher.infer({"x": x})) for x in xs]
    await _settle()
    assert batcher.calls == 0  # not full, delay not over: only draining runs them
    await batcher.aclose()
    for x, task in zip(xs, tasks, strict=True):
        _check(weights, x, task.result())
    assert (batcher.calls, batcher.rows) == (1, 3)
    with pytest.raises(NotReady):
        await batcher.infer({"x": xs[0]})


async def test_direct_path_a_model_that_mixes_rows_stops_being_batched(tmp_path: Path) -> None:
    path = tmp_path / "sum.onnx"
    models.build_onnx_batch_sum(path, 3)
    batcher = await _direct(path, 2)
    try:
        xs = [np.full((1, 3), i + 1, np.float32) for i in range(2)]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out["total"], x[0])  # each request's own sum
        assert (batcher.calls, batcher.rows) == (3, 4)  # stacked, then each alone
        more = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        assert [float(o["total"][0]) for o in more] == [1.0, 2.0]
        assert batcher.calls == 3  # switched off: straight to the runtime, not counted
    finally:
        await batcher.aclose()


@pytest.mark.parametrize("rows", [[1, 1, 1, 1], [1, 3, 2, 2]], ids=["one-row-each", "mixed"])
async def test_direct_path_single_output_split_gives_each_caller_its_rows(
    tmp_path: Path, rows: list[int]
) -> None:
    """A one-output model (the split's common case): each caller gets exactly its rows."""
    path = tmp_path / "mlp.onnx"
    params = models.build_onnx_mlp(path, 5, 7, 3, seed=4)
    batcher = await _direct(path, sum(rows))
    try:
        rng = np.random.default_rng(5)
        xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in rows]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
        assert (batcher.calls, batcher.rows) == (1, sum(rows))  # one stacked call
        for x, out in zip(xs, outs, strict=True):
            assert list(out) == ["probs"]
            np.testing.assert_allclose(
                out["probs"], models.mlp_oracle(params, x), rtol=1e-5, atol=1e-6
            )
    finally:
        await batcher.aclose()
