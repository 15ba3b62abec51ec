"""A failing candidate never reaches the client, and every failure is counted by reason.

Real V2 upstreams on loopback (tests/proxy/upstream.py) behind the real proxy app. For
each way a candidate can fail — refused connections, a call that never answers, a slow
one, garbage shapes, an extra row, NaN, an HTML page, a connection dropped mid-body —
every live request gets the champion's correct answer; the pair is recorded with the
candidate's error; ``mirrorgate_shadow_failures_total{reason}`` counts it; and the
rollout's errors gate (``GET /v1/rollout``) sees a candidate error rate of 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.faults.helpers import AUTH, TOKEN, body, features, own_upstream, until
from tests.proxy.conftest import make_config

N = 6
MIRROR_TIMEOUT_MS = 400

# mode -> the reason token the pair's error and the failure counter carry
FAILURES = {
    "down": "backend_error",
    "hang": "timeout",
    "error": "backend_error",
    "garbage": "backend_error",
    "wrong_rows": "shape_mismatch",
    "nan": "non_finite_output",
    "non_json": "backend_error",
    "crash": "backend_error",
}


async def _run(start_upstream: Any, start_proxy: Any, mode: str, **fault: Any) -> Any:
    champion = await start_upstream(seed=1)
    candidate = await own_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        server={"control_token": TOKEN},
        # The breaker stays closed here: every call must reach the failing candidate.
        mirror={"timeout_ms": MIRROR_TIMEOUT_MS, "circuit": {"failure_threshold": 1000}},
    )
    proxy = await start_proxy(config)
    if mode == "down":
        # Loaded while it was up (start-up checks reachability), then gone: refused.
        await candidate.close()
    elif mode != "normal":
        candidate.upstream.set_fault(mode, **fault)
    for i in range(N):
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
        doc = await resp.json()
        probs = next(o for o in doc["outputs"] if o["name"] == "probs")
        expected = champion.upstream.model.predict(features(i))["probs"]
        np.testing.assert_allclose(np.array(probs["data"]).reshape(1, -1), expected, rtol=1e-5)
    await until(lambda: len(proxy.sink.records) == N, f"{N} pairs recorded")
    return champion, candidate, proxy


@pytest.mark.parametrize("mode", sorted(FAILURES))
async def test_failing_candidate_is_invisible_to_clients_and_counted(
    start_upstream: Any, start_proxy: Any, mode: str
) -> None:
    reason = FAILURES[mode]
    _, candidate, proxy = await _run(start_upstream, start_proxy, mode)
    await candidate.close()
    records = proxy.sink.records
    assert all(r.champion.error is None for r in records)
    assert all(r.candidate.error is not None for r in records), [r.candidate for r in records]
    assert {r.candidate.error.split(":", 1)[0] for r in records} == {reason}
    assert proxy.metric("mirrorgate_shadow_failures_total", reason=reason) == N
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="200") == N

    # /metrics carries the same count, by reason.
    text = await (await proxy.client.get("/metrics")).text()
    assert f'mirrorgate_shadow_failures_total{{reason="{reason}"}} {float(N)}' in text

    # The rollout's errors gate counts them: every pair a candidate failure.
    await proxy.state.rollout.evaluate_now()
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    gates = {g["name"]: g for g in status["gates"] if g["slice"] == "*"}
    gate = gates["errors.timeout_rate" if reason == "timeout" else "errors.error_rate"]
    assert gate["n"] == N
    assert gate["details"]["candidate_rate"] == 1.0
    assert gate["details"]["champion_rate"] == 0.0
    assert gate["status"] != "PASS"


async def test_slow_candidate_is_recorded_with_its_latency_and_not_as_a_failure(
    start_upstream: Any, start_proxy: Any
) -> None:
    delay_s = 0.15  # far above the champion's loopback latency (10x and more)
    _, candidate, proxy = await _run(start_upstream, start_proxy, "slow", delay_s=delay_s)
    await candidate.close()
    records = proxy.sink.records
    assert all(r.candidate.error is None and r.champion.error is None for r in records)
    # Recorded latencies are values the proxy measured around a sleep: a lower bound.
    assert all(r.candidate.latency_ms >= delay_s * 1000 for r in records)
    assert all(r.champion.latency_ms < r.candidate.latency_ms for r in records)
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="200") == N
    await proxy.state.rollout.evaluate_now()
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    errors = next(g for g in status["gates"] if g["name"] == "errors.error_rate")
    assert errors["details"]["candidate_rate"] == 0.0
    latency = [g for g in status["gates"] if g["name"].startswith("latency.")]
    assert latency and all(g["n"] == N for g in latency)
    # the gate sees the candidate slower at every quantile it watches, and the paired
    # check sees it over the limit on every request (10x and more slower)
    quantiles = [g for g in latency if g["name"] != "latency.paired"]
    assert quantiles
    assert all(g["details"]["candidate_ms"] > g["details"]["champion_ms"] for g in quantiles)
    paired = next(g for g in latency if g["name"] == "latency.paired")
    assert paired["statistic"] == 1.0
