"""A circuit breaker for the candidate (Envoy's outlier ejection / Hystrix's breaker).

A dead or hanging candidate must cost nothing per request: without the breaker every
mirrored request still opens a connection or waits out ``mirror.timeout_ms``, and every
failure becomes a pair, a harvest match and log lines. The breaker counts *consecutive*
call failures (timeouts, transport errors, 5xx: the model is unwell, not the input);
after ``failure_threshold`` of them it opens: no candidate call is made for ``open_s``
(mirrored work is skipped and counted as ``mirrorgate_shadow_dropped_total
{reason="circuit_open"}``; canary requests go to the champion). Then it is half-open:
``half_open_probes`` calls go through; a success closes it, a failure opens it again
for twice as long (up to ``max_open_s``).

State is in ``mirrorgate_shadow_circuit_state`` (0 closed, 1 open, 2 half-open) and
``mirrorgate_shadow_circuit_transitions_total{to}``. The breaker is plain logic with an
injected clock, used from one event loop (or one worker), so it needs no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.core.runtime_settings import CircuitSettings

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}
# Failure reasons that say the candidate is unwell (not that one input was bad).
TRIPPING_REASONS = frozenset({"timeout", "backend_error", "exception", "error"})


class CircuitBreaker:
    def __init__(
        self,
        settings: CircuitSettings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "candidate",
    ) -> None:
        self.settings = settings
        self.name = name
        self.clock = clock  # public: tests move time without sleeping
        self.state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._open_for = settings.open_s
        self._probes = 0  # probes in flight while half-open
        registry = registry if registry is not None else CollectorRegistry()
        self._gauge = Gauge(
            "mirrorgate_shadow_circuit_state",
            "Candidate circuit breaker: 0 closed, 1 open (no calls), 2 half-open (probing)",
            registry=registry,
        )
        self._transitions = Counter(
            "mirrorgate_shadow_circuit_transitions_total",
            "Candidate circuit breaker state changes, by the state entered",
            ["to"],
            registry=registry,
        )
        for state in STATE_VALUES:
            self._transitions.labels(state)

    def allow(self) -> bool:
        """May a candidate call start now? (Half-open: a probe slot is taken.)"""
        if not self.settings.enabled or self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self._opened_at < self._open_for:
                return False
            self._enter("half_open")
        if self._probes >= self.settings.half_open_probes:
            return False
        self._probes += 1
        return True

    def rejecting(self) -> bool:
        """Would ``allow()`` say no now? (Takes no probe slot: for the cheap early skip.)"""
        if not self.settings.enabled or self.state == "closed":
            return False
        if self.state == "open":
            return self.clock() - self._opened_at < self._open_for
        return self._probes >= self.settings.half_open_probes

    def cancelled(self) -> None:
        """A call ``allow()`` let through ended without an outcome: free its probe."""
        if self.state == "half_open":
            self._probes = max(0, self._probes - 1)

    def record(self, ok: bool, reason: str | None = None) -> None:
        """The outcome of a call that ``allow()`` let through."""
        if not self.settings.enabled:
            return
        tripping = not ok and (reason is None or reason in TRIPPING_REASONS)
        if self.state == "half_open":
            self._probes = max(0, self._probes - 1)
            if tripping:
                self._open_for = min(self._open_for * 2, self.settings.max_open_s)
                self._open()
            else:
                self._open_for = self.settings.open_s
                self._failures = 0
                self._enter("closed")
            return
        if not tripping:
            self._failures = 0
            return
        self._failures += 1
        if self.state == "closed" and self._failures >= self.settings.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._enter("open")
        log.warning(
            "%s circuit open after %d consecutive failure(s): no calls for %.1f s",
            self.name,
            self._failures,
            self._open_for,
        )

    def _enter(self, state: State) -> None:
        if state == self.state and state != "open":
            return
        if state != "half_open":
            self._probes = 0
        self.state = state
        self._gauge.set(STATE_VALUES[state])
        self._transitions.labels(state).inc()
        if state == "closed":
            log.info("%s circuit closed: calls resume", self.name)
