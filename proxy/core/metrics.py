"""The proxy's Prometheus metrics, on a registry passed in (never the global one).

Names are the project's agreed ones. Two families live elsewhere and are registered by
their owners on the same registry: ``mirrorgate_batcher_batch_size`` (the micro-batcher)
and ``mirrorgate_recorder_*`` (the storage recorder).

``mirrorgate_proxy_requests_total{role,code}`` and
``mirrorgate_proxy_request_duration_seconds{role}`` count every *model call*, live or
mirrored, under the model's role, with the HTTP status its outcome maps to (200, 400,
502, 504, ...). That makes champion-vs-candidate error rates and latencies comparable on
one dashboard while the candidate is only shadowed. Requests rejected before any model
is called (malformed body, unknown model) are live traffic answered on the champion's
path, so they count under ``role="champion"``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.core.logqueue import DroppedLogRecords

# Inference latencies: sub-millisecond loopback calls up to multi-second timeouts.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

GATE_STATUS_VALUES = {"pass": 0, "inconclusive": 1, "fail": 2}


class ProxyMetrics:
    """Request, shadow, gate and rollout metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._calls: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "mirrorgate_proxy_requests",
            "Model calls by role (champion|candidate) and resulting HTTP status code.",
            ["role", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "mirrorgate_proxy_request_duration_seconds",
            "Model call latency by role, seconds.",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "mirrorgate_shadow_dropped",
            "Mirrored work not done, by reason (queue_full, queue_bytes, shutdown).",
            ["reason"],
            registry=registry,
        )
        self.shadow_failures = Counter(
            "mirrorgate_shadow_failures",
            "Mirrored model calls that failed, by reason (timeout, backend_error, ...).",
            ["reason"],
            registry=registry,
        )
        self.shadow_in_flight = Gauge(
            "mirrorgate_shadow_in_flight",
            "Mirrored model calls running now.",
            registry=registry,
        )
        self.shadow_queue_depth = Gauge(
            "mirrorgate_shadow_queue_depth",
            "Mirrored requests waiting for an in-flight slot.",
            registry=registry,
        )
        self.gate_status = Gauge(
            "mirrorgate_gate_status",
            "Gate status: 0 pass, 1 inconclusive, 2 fail.",
            ["gate", "slice"],
            registry=registry,
        )
        self.gate_statistic = Gauge(
            "mirrorgate_gate_statistic",
            "The gate's current test statistic.",
            ["gate", "slice"],
            registry=registry,
        )
        self.gate_threshold = Gauge(
            "mirrorgate_gate_threshold",
            "The threshold the gate's statistic is compared with.",
            ["gate", "slice"],
            registry=registry,
        )
        self.rollout_verdict = Gauge(
            "mirrorgate_rollout_verdict",
            "1 on the current verdict (continue|promote|abort), 0 on the others.",
            ["verdict"],
            registry=registry,
        )
        self.rollout_stage = Gauge(
            "mirrorgate_rollout_stage",
            "1 on the current rollout stage, 0 on the others.",
            ["stage"],
            registry=registry,
        )
        self.rollout_canary_weight = Gauge(
            "mirrorgate_rollout_canary_weight",
            "Share of live traffic served by the candidate (0..1).",
            registry=registry,
        )
        # The process's queued logging (proxy/core/logqueue.py): records it dropped.
        registry.register(DroppedLogRecords())

    def observe_call(self, role: str, code: int, seconds: float | None) -> None:
        # Per request on the live path: the labelled children are looked up once and
        # kept (prometheus_client's labels() takes a lock and builds a key every call).
        key = (role, code)
        children = self._calls.get(key)
        if children is None:
            children = (
                self.requests.labels(role=role, code=str(code)),
                self.request_duration.labels(role=role),
            )
            if len(self._calls) < 1024:  # roles x statuses: a handful in practice
                self._calls[key] = children
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)

    def observe_champion(self, code: int, seconds: float | None) -> None:
        self.observe_call("champion", code, seconds)

    def set_gate(
        self, gate: str, slice_: str, status: str, statistic: float, threshold: float
    ) -> None:
        self.gate_status.labels(gate=gate, slice=slice_).set(GATE_STATUS_VALUES[status])
        self.gate_statistic.labels(gate=gate, slice=slice_).set(statistic)
        self.gate_threshold.labels(gate=gate, slice=slice_).set(threshold)

    def set_samples(self, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        """Set gate and rollout gauges from ``(metric name, labels, value)`` triples.

        The engine's ``Evaluation.metric_samples()`` produces them, so the gauges always
        mirror exactly what the decision was made on.
        """
        gauges = {
            "mirrorgate_gate_status": self.gate_status,
            "mirrorgate_gate_statistic": self.gate_statistic,
            "mirrorgate_gate_threshold": self.gate_threshold,
            "mirrorgate_rollout_verdict": self.rollout_verdict,
            "mirrorgate_rollout_stage": self.rollout_stage,
            "mirrorgate_rollout_canary_weight": self.rollout_canary_weight,
        }
        for name, labels, value in samples:
            gauge = gauges.get(name)
            if gauge is None:
                continue
            (gauge.labels(**labels) if labels else gauge).set(value)

    def set_verdict(self, verdict: str) -> None:
        for name in ("continue", "promote", "abort"):
            self.rollout_verdict.labels(verdict=name).set(1 if name == verdict else 0)

    def set_stage(self, stage: str, known: tuple[str, ...] = ()) -> None:
        """Mark ``stage`` current; every stage seen before (and ``known``) goes to 0."""
        for name in {*known, *self._stages_seen()}:
            self.rollout_stage.labels(stage=name).set(0)
        self.rollout_stage.labels(stage=stage).set(1)

    def _stages_seen(self) -> list[str]:
        seen = []
        for metric in self.rollout_stage.collect():
            for sample in metric.samples:
                seen.append(sample.labels["stage"])
        return seen
