"""The candidate's circuit breaker: a dead candidate costs nothing per request.

Unit half: the state machine on an injected clock. Integration half: a real V2 upstream
answering 500 behind the real proxy app; after ``failure_threshold`` failures no call
reaches it, every live request is still the champion's 200, and the accounting is
exact: every answered request is a recorded pair or a counted ``circuit_open`` drop.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from proxy.core.runtime_settings import CircuitSettings
from proxy.dataplane.breaker import CircuitBreaker
from tests.faults.helpers import body, own_upstream, until
from tests.proxy.conftest import make_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _breaker(**kw: Any) -> tuple[CircuitBreaker, Clock, CollectorRegistry]:
    clock, registry = Clock(), CollectorRegistry()
    settings = CircuitSettings(**{"failure_threshold": 3, "open_s": 10, "max_open_s": 25, **kw})
    return CircuitBreaker(settings, registry=registry, clock=clock), clock, registry


def _transitions(registry: CollectorRegistry, to: str) -> float:
    value = registry.get_sample_value("mirrorgate_shadow_circuit_transitions_total", {"to": to})
    return value or 0.0


def test_opens_after_consecutive_failures_probes_and_closes() -> None:
    b, clock, registry = _breaker()
    for _ in range(2):
        assert b.allow()
        b.record(False, "timeout")
    b.record(True)  # a success resets the run of failures
    for _ in range(2):
        b.record(False, "backend_error")
    assert b.state == "closed" and b.allow()
    b.record(False, "backend_error")
    assert b.state == "open" and b.rejecting() and not b.allow()
    assert registry.get_sample_value("mirrorgate_shadow_circuit_state") == 1
    clock.now = 10.0
    assert not b.rejecting() and b.allow()  # half-open: one probe
    assert b.state == "half_open" and not b.allow() and b.rejecting()
    b.record(False, "timeout")  # the probe failed: open for twice as long
    assert b.state == "open"
    clock.now = 29.0
    assert not b.allow()
    clock.now = 30.0
    assert b.allow()
    b.record(True)
    assert b.state == "closed" and b.allow()
    assert registry.get_sample_value("mirrorgate_shadow_circuit_state") == 0
    assert (_transitions(registry, "open"), _transitions(registry, "half_open")) == (2, 2)
    assert _transitions(registry, "closed") == 1


def test_bad_input_answers_do_not_open_it_and_a_cancelled_probe_frees_its_slot() -> None:
    b, clock, _ = _breaker(failure_threshold=1)
    b.record(False, "bad_request")  # the model is alive; this input was bad
    b.record(False, "shape_mismatch")
    assert b.state == "closed"
    b.record(False, "timeout")
    assert b.state == "open"
    clock.now = 10.0
    assert b.allow() and not b.allow()
    b.cancelled()
    assert b.allow()


def test_disabled_breaker_always_allows() -> None:
    b, _, _ = _breaker(enabled=False, failure_threshold=1)
    for _ in range(5):
        b.record(False, "timeout")
    assert b.allow() and b.state == "closed"


async def test_dead_candidate_is_not_called_once_the_circuit_opens(
    start_upstream: Any, start_proxy: Any
) -> None:
    n, threshold = 40, 3
    champion = await start_upstream(seed=1)
    candidate = await own_upstream(seed=2, mode="error")
    try:
        config = make_config(
            champion.url,
            candidate.url,
            mirror={"circuit": {"failure_threshold": threshold, "open_s": 3600}},
        )
        proxy = await start_proxy(config)
        for i in range(n):
            resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
            assert resp.status == 200
            assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
            if i == threshold - 1:  # let the first failures land: the circuit opens
                await until(lambda: proxy.state.mirror.breaker.state == "open", "open")
        await until(lambda: proxy.state.mirror.in_flight == 0, "mirrored work done")
        calls = candidate.upstream.stats.started
        failures = proxy.metric("mirrorgate_shadow_failures_total", reason="backend_error")
        skipped = proxy.metric("mirrorgate_shadow_dropped_total", reason="circuit_open")
        assert calls == failures == threshold
        assert skipped == n - threshold
        # exact accounting: answered = pairs recorded + counted drops
        await until(lambda: len(proxy.sink.records) == calls, "pairs of the calls made")
        assert len(proxy.sink.records) + skipped == n
        assert proxy.metric("mirrorgate_shadow_circuit_state") == 1
        assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="200") == n

        # The candidate recovers; after the open period one probe closes the circuit.
        candidate.upstream.set_fault("normal")
        breaker = proxy.state.mirror.breaker
        breaker.clock = lambda: float("inf")  # the open period is over
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(n))
        assert resp.status == 200
        await until(lambda: breaker.state == "closed", "closed after a good probe")
        await until(lambda: len(proxy.sink.records) == calls + 1, "the probe's pair")
        assert proxy.sink.records[-1].candidate.error is None
    finally:
        await candidate.close()
