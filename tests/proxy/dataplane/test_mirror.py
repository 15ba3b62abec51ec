"""Mirror dispatch: shadow isolation, bounds, failures, canary routing, pair records.

Every assertion is on ordering or counts (the upstreams park calls until released),
never on wall-clock time.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import numpy as np
import pytest

from gates.records import PairRecord
from proxy.backends.http import HttpBackend
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.mirror import MirrorDispatcher
from proxy.protocol.digest import inputs_digest
from storage.sink import MemorySink
from tests.proxy.conftest import N_FEATURES, NumpyBackend, make_config
from tests.proxy.upstream import UpstreamModel

INFER = "/v2/models/classifier/infer"


def _x(rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


def _req(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
        **extra,
    }


async def _settled(proxy: Any) -> None:
    mirror = proxy.state.mirror if hasattr(proxy, "state") else proxy
    for _ in range(1000):
        if mirror.in_flight == 0 and mirror.queued == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("mirrored work did not settle")


async def test_live_responses_never_wait_for_a_slow_candidate(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2, mode="hold")
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    n = 12
    responses = await asyncio.gather(
        *(proxy.client.post(INFER, json=_req(_x(1, i), id=f"r{i}")) for i in range(n))
    )
    # Every live answer is in while not one candidate call has finished.
    assert [r.status for r in responses] == [200] * n
    await asyncio.wait_for(candidate.upstream.wait_for(started=n), 30)
    assert candidate.upstream.stats.finished == 0
    assert champion.upstream.stats.finished == n
    assert len(proxy.sink.records) == 0
    assert proxy.metric("mirrorgate_shadow_in_flight") == n
    candidate.upstream.release()
    await _settled(proxy)
    assert candidate.upstream.stats.finished == n
    assert sorted(r.id for r in proxy.sink.records) == sorted(f"r{i}" for i in range(n))
    # In the candidate's log every start precedes the first finish: all n were parked.
    kinds = [k for k, _ in candidate.upstream.events]
    assert kinds == ["start"] * n + ["finish"] * n


async def test_shadow_work_is_bounded_and_overflow_counted(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2, mode="hold")
    config = make_config(champion.url, candidate.url, mirror={"max_in_flight": 3, "queue_size": 4})
    proxy = await start_proxy(config)
    n = 15
    for i in range(n):  # sequential: a deterministic arrival order
        assert (await proxy.client.post(INFER, json=_req(_x(1, i), id=f"r{i}"))).status == 200
    await asyncio.wait_for(candidate.upstream.wait_for(started=3), 30)
    assert proxy.metric("mirrorgate_shadow_in_flight") == 3
    assert proxy.metric("mirrorgate_shadow_queue_depth") == 4
    assert proxy.metric("mirrorgate_shadow_dropped_total", reason="queue_full") == n - 7
    candidate.upstream.release()
    await _settled(proxy)
    # The first 3 ran, the next 4 waited and ran, the rest were dropped.
    assert sorted(r.id for r in proxy.sink.records) == sorted(f"r{i}" for i in range(7))
    assert candidate.upstream.stats.max_in_flight == 3
    assert proxy.metric("mirrorgate_shadow_queue_depth") == 0


async def test_queue_is_bounded_in_bytes_too(start_upstream: Any, start_proxy: Any) -> None:
    # In-process champion: queued work holds decoded input arrays (a remote champion's
    # pass-through work holds its raw request and answer bytes instead).
    champion = NumpyBackend(UpstreamModel(N_FEATURES, 3, 1))
    candidate = await start_upstream(seed=2, mode="hold")
    row_bytes = 4 * N_FEATURES
    config = make_config(
        candidate.url,
        candidate.url,
        mirror={"max_in_flight": 1, "queue_size": 100, "max_queue_bytes": 2 * row_bytes},
    )
    proxy = await start_proxy(config, champion=champion)
    for i in range(6):
        assert (await proxy.client.post(INFER, json=_req(_x(1, i)))).status == 200
    assert proxy.metric("mirrorgate_shadow_queue_depth") == 2
    assert proxy.metric("mirrorgate_shadow_dropped_total", reason="queue_bytes") == 3
    candidate.upstream.release()
    await _settled(proxy)
    assert len(proxy.sink.records) == 3


@pytest.mark.parametrize(
    ("fault", "config", "reason"),
    [
        ({"mode": "error", "status": 500, "message": "boom"}, {}, "backend_error"),
        ({"mode": "hang"}, {"mirror": {"timeout_ms": 50}}, "timeout"),
        ({"mode": "crash"}, {}, "backend_error"),
        ({"mode": "non_json"}, {}, "backend_error"),
        ({"mode": "nan"}, {}, "non_finite_output"),
        ({"mode": "error", "status": 400, "message": "bad shape"}, {}, "bad_request"),
    ],
    ids=["http-500", "timeout", "crash", "non-json", "nan", "http-400"],
)
async def test_candidate_failure_is_recorded_never_seen_by_the_client(
    start_upstream: Any,
    start_proxy: Any,
    fault: dict[str, Any],
    config: dict[str, Any],
    reason: str,
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2, **fault)
    proxy = await start_proxy(make_config(champion.url, candidate.url, **config))
    x = _x(1)
    resp = await proxy.client.post(INFER, json=_req(x, id="r1"))
    assert resp.status == 200
    assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
    await _settled(proxy)
    (record,) = proxy.sink.records
    assert record.champion.ok
    assert record.candidate.output is None
    assert record.candidate.error is not None and record.candidate.error.startswith(reason)
    assert record.candidate.latency_ms is not None
    assert proxy.metric("mirrorgate_shadow_failures_total", reason=reason) == 1.0


async def test_batched_request_gives_one_record_per_row(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        features={"input": "x", "names": ["age", "income", "f2", "f3"]},
        slices={"headers": ["platform"], "parameters": ["tenant"], "rules": {"old": "age >= 0"}},
        storage={"capture": "all"},
    )
    proxy = await start_proxy(config)
    x = _x(3, seed=5)
    resp = await proxy.client.post(
        INFER,
        json=_req(x, id="b", parameters={"tenant": "acme"}),
        headers={"X-Mirrorgate-Slice-platform": "mobile", "X-Mirrorgate-Slice-other": "nope"},
    )
    assert resp.status == 200
    await _settled(proxy)
    records: list[PairRecord] = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == ["b#0", "b#1", "b#2"]
    ch = champion.model.predict(x)["probs"]
    ca = candidate.model.predict(x)["probs"]
    for row, record in enumerate(records):
        np.testing.assert_allclose(record.champion.output, ch[row], rtol=1e-6)
        np.testing.assert_allclose(record.candidate.output, ca[row], rtol=1e-6)
        assert record.features["age"] == pytest.approx(float(x[row, 0]))
        assert record.features["income"] == pytest.approx(float(x[row, 1]))
        assert record.slices == {
            "platform": "mobile",
            "tenant": "acme",
            "old": "true" if x[row, 0] >= 0 else "false",
        }
        assert record.served_by == "champion" and record.stage == "shadow"
        assert record.inputs is not None
        np.testing.assert_array_equal(record.inputs["x"], x[row])
        # The row's digest is the digest of that row sent alone.
        assert record.inputs_digest == inputs_digest({"x": x[row : row + 1]}, 0)
    assert len({r.inputs_digest for r in records}) == 3
    # The JSONL form carries what DESIGN.md lists.
    doc = records[0].to_dict()
    assert set(doc) >= {"id", "ts", "slices", "features", "champion", "candidate", "label"}


async def test_candidate_with_wrong_row_count_is_a_shape_mismatch(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2, mode="wrong_rows")
    proxy = await start_proxy(
        make_config(champion.url, candidate.url, storage={"capture": "never"})
    )
    assert (await proxy.client.post(INFER, json=_req(_x(2), id="w"))).status == 200
    await _settled(proxy)
    records = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == ["w#0", "w#1"]
    assert all(r.champion.ok for r in records)
    assert all((r.candidate.error or "").startswith("shape_mismatch") for r in records)
    assert all(r.inputs is None for r in records)
    assert proxy.metric("mirrorgate_shadow_failures_total", reason="shape_mismatch") == 1.0


async def test_sampling_and_a_failing_sink(start_upstream: Any, start_proxy: Any) -> None:
    class BrokenSink(MemorySink):
        def submit(self, record: PairRecord) -> bool:
            raise RuntimeError("sink bug")

    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    good = MemorySink()
    config = make_config(champion.url, candidate.url, mirror={"sample_rate": 0.0})
    proxy = await start_proxy(config, sink=good)
    proxy.state.mirror.sinks.insert(0, BrokenSink())
    for i in range(5):
        assert (await proxy.client.post(INFER, json=_req(_x(1, i)))).status == 200
    assert candidate.upstream.stats.started == 0  # sample_rate 0: nothing mirrored
    proxy.state.mirror._mirror.sample_rate = 0.5
    proxy.state.mirror._rng = random.Random(3)
    n = 200
    for i in range(n):
        assert (await proxy.client.post(INFER, json=_req(_x(1, i)))).status == 200
    await _settled(proxy)
    mirrored = candidate.upstream.stats.started
    # Binomial(200, 0.5): mean 100, sd ~7; 6 sd either side.
    assert 58 <= mirrored <= 142
    assert len(good.records) == mirrored  # the broken sink did not stop the good one


async def _dispatcher(
    start_upstream: Any, **sections: Any
) -> tuple[MirrorDispatcher, MemorySink, Any, Any]:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(champion.url, candidate.url, **sections)
    assert config.models.candidate is not None
    sink = MemorySink()
    from prometheus_client import CollectorRegistry

    mirror = MirrorDispatcher(
        champion=await HttpBackend.create(config.models.champion),
        candidate=await HttpBackend.create(config.models.candidate),
        config=config,
        sinks=[sink],
        metrics=ProxyMetrics(CollectorRegistry()),
        rng=random.Random(11),
    )
    return mirror, sink, champion, candidate


async def _close(mirror: MirrorDispatcher) -> None:
    await mirror.drain(5.0)
    await mirror.champion.aclose()
    assert mirror.candidate is not None
    await mirror.candidate.aclose()


async def test_canary_share_and_pairs_for_both_routes(start_upstream: Any) -> None:
    mirror, sink, champion, candidate = await _dispatcher(
        start_upstream, mirror={"mode": "canary", "canary_weight": 0.3}
    )
    try:
        assert mirror.stage == "canary"
        n = 250
        served = []
        for i in range(n):
            x = _x(1, i)
            result = await mirror.infer({"x": x}, request_id=f"r{i}")
            served.append(result.served_by)
            model = candidate if result.served_by == "candidate" else champion
            np.testing.assert_allclose(result.outputs["probs"], model.model.predict(x)["probs"])
        k = served.count("candidate")
        sd = math.sqrt(n * 0.3 * 0.7)
        assert abs(k - 0.3 * n) <= 6 * sd
        await _settled(mirror)
        by_id = {r.id: r for r in sink.records}
        assert len(by_id) == n
        for i, route in enumerate(served):
            record = by_id[f"r{i}"]
            assert record.served_by == route
            assert record.champion.ok and record.candidate.ok  # both computed for the pair
    finally:
        await _close(mirror)


async def test_canary_is_sticky_and_monotone_in_the_weight(start_upstream: Any) -> None:
    mirror, _, _, _ = await _dispatcher(
        start_upstream, mirror={"mode": "canary", "canary_weight": 0.3, "sticky_header": "X-User"}
    )
    try:
        users = [f"user-{i}" for i in range(120)]
        first: dict[str, str] = {}
        for _ in range(2):
            for user in users:
                r = await mirror.infer({"x": _x(1)}, request_id=user, sticky_key=user)
                assert first.setdefault(user, r.served_by) == r.served_by
        on_candidate = {u for u, s in first.items() if s == "candidate"}
        sd = math.sqrt(len(users) * 0.3 * 0.7)
        assert abs(len(on_candidate) - 0.3 * len(users)) <= 6 * sd
        mirror.set_canary_weight(0.6)
        later = set()
        for user in users:
            r = await mirror.infer({"x": _x(1)}, request_id=user, sticky_key=user)
            if r.served_by == "candidate":
                later.add(user)
        assert on_candidate <= later and len(later) > len(on_candidate)
        mirror.set_canary_weight(0.0)
        r = await mirror.infer({"x": _x(1)}, request_id="z", sticky_key=users[0])
        assert r.served_by == "champion"
        with pytest.raises(ValueError):
            mirror.set_canary_weight(1.5)
    finally:
        await _close(mirror)


async def test_canary_candidate_failure_falls_back_to_the_champion(start_upstream: Any) -> None:
    mirror, sink, champion, candidate = await _dispatcher(
        start_upstream, mirror={"mode": "canary", "canary_weight": 1.0}
    )
    try:
        candidate.upstream.set_fault("error", status=503, message="candidate down")
        x = _x(1)
        result = await mirror.infer({"x": x}, request_id="c1")
        assert result.served_by == "champion"
        np.testing.assert_allclose(result.outputs["probs"], champion.model.predict(x)["probs"])
        await _settled(mirror)
        (record,) = sink.records
        assert record.served_by == "champion" and record.champion.ok
        assert (record.candidate.error or "").startswith("backend_error: ")
        assert "candidate down" in (record.candidate.error or "")
    finally:
        await _close(mirror)


async def test_canary_never_waits_for_the_champion_side(start_upstream: Any) -> None:
    mirror, sink, champion, _ = await _dispatcher(
        start_upstream, mirror={"mode": "canary", "canary_weight": 1.0}
    )
    try:
        champion.upstream.set_fault("hold")
        results = [await mirror.infer({"x": _x(1, i)}, request_id=f"r{i}") for i in range(5)]
        assert {r.served_by for r in results} == {"candidate"}
        assert champion.upstream.stats.finished == 0 and len(sink.records) == 0
        champion.upstream.release()
        await _settled(mirror)
        assert len(sink.records) == 5
        assert all(r.served_by == "candidate" and r.champion.ok for r in sink.records)
    finally:
        await _close(mirror)


async def test_shutdown_drains_then_cuts_and_counts(start_upstream: Any) -> None:
    mirror, sink, _, candidate = await _dispatcher(start_upstream)
    try:
        for i in range(3):
            await mirror.infer({"x": _x(1, i)}, request_id=f"done{i}")
        await _settled(mirror)
        candidate.upstream.set_fault("hang")
        for i in range(4):
            await mirror.infer({"x": _x(1, i)}, request_id=f"cut{i}")
        await asyncio.wait_for(candidate.upstream.wait_for(started=7), 30)
        cut = await mirror.drain(0.05)
        assert cut == 4
        assert (
            mirror.metrics.registry.get_sample_value(
                "mirrorgate_shadow_dropped_total", {"reason": "shutdown"}
            )
            == 4.0
        )
        assert sorted(r.id for r in sink.records) == ["done0", "done1", "done2"]
        # After drain, new live requests are still answered; their mirror is dropped.
        result = await mirror.infer({"x": _x(1)}, request_id="late")
        assert result.served_by == "champion"
        assert (
            mirror.metrics.registry.get_sample_value(
                "mirrorgate_shadow_dropped_total", {"reason": "shutdown"}
            )
            == 5.0
        )
    finally:
        await _close(mirror)
