"""mirrorgate's agreed Prometheus metric names, and a sample exposition built from them.

The names, types and label names are the project's contract (the common brief): the
proxy exports them, and the rules, dashboard and analysis templates in deploy/ read them.
``sample_registry()`` builds an exposition with prometheus_client exactly as the proxy
does (a registry passed in, never the global one); once ``mirrorgate serve`` runs in the
tests, test_image_recipe checks the live ``/metrics`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.control.ops_metrics import OpsMetrics
from proxy.core.logqueue import DroppedLogRecords


@dataclass(frozen=True)
class Agreed:
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...] = ()

    def series_names(self) -> set[str]:
        """Names that may appear in PromQL for this metric."""
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


AGREED: tuple[Agreed, ...] = (
    Agreed("mirrorgate_proxy_requests_total", "counter", ("role", "code")),
    Agreed("mirrorgate_proxy_request_duration_seconds", "histogram", ("role",)),
    Agreed("mirrorgate_shadow_dropped_total", "counter", ("reason",)),
    Agreed("mirrorgate_shadow_failures_total", "counter", ("reason",)),
    Agreed("mirrorgate_shadow_in_flight", "gauge"),
    Agreed("mirrorgate_shadow_queue_depth", "gauge"),
    Agreed("mirrorgate_batcher_batch_size", "histogram", ("model",)),
    Agreed("mirrorgate_recorder_written_total", "counter"),
    Agreed("mirrorgate_recorder_dropped_total", "counter", ("reason",)),
    Agreed("mirrorgate_recorder_buffer_depth", "gauge"),
    Agreed("mirrorgate_gate_status", "gauge", ("gate", "slice")),
    Agreed("mirrorgate_gate_statistic", "gauge", ("gate", "slice")),
    Agreed("mirrorgate_gate_threshold", "gauge", ("gate", "slice")),
    Agreed("mirrorgate_rollout_verdict", "gauge", ("verdict",)),
    Agreed("mirrorgate_rollout_stage", "gauge", ("stage",)),
    Agreed("mirrorgate_rollout_canary_weight", "gauge"),
    # rollout lifecycle (proxy/control/ops_metrics.py)
    Agreed("mirrorgate_gate_blocking_status", "gauge", ("gate", "slice")),
    Agreed("mirrorgate_build_info", "gauge", ("version", "rollout_id", "revision")),
    Agreed("mirrorgate_rollout_decisions_unpersisted", "gauge"),
    Agreed("mirrorgate_rollout_decision_persist_failures_total", "counter"),
    Agreed("mirrorgate_rollout_identity_changes_total", "counter", ("action",)),
    Agreed("mirrorgate_proxy_live_duration_seconds", "histogram", ("code_class",)),
    Agreed("mirrorgate_labels_total", "counter", ("status",)),
    Agreed("mirrorgate_labels_unmatched", "gauge"),
    # the process's queued logging (proxy/core/logqueue.py)
    Agreed("mirrorgate_logging_dropped_total", "counter"),
)

SERIES_NAMES: frozenset[str] = frozenset(n for a in AGREED for n in a.series_names())
# Labels a query may use: the metrics' own, histogram buckets, and the target labels that
# Prometheus (job, instance) and the Operator's ServiceMonitor (namespace, pod, service)
# attach.
LABELS: frozenset[str] = frozenset(
    {label for a in AGREED for label in a.labels}
    | {"le", "job", "instance", "namespace", "pod", "service", "container", "endpoint"}
)
LABEL_VALUES: dict[str, frozenset[str]] = {
    "role": frozenset({"champion", "candidate"}),
    "verdict": frozenset({"continue", "promote", "abort"}),
}


def sample_registry() -> CollectorRegistry:
    """Every agreed metric with a few realistic samples."""
    registry = CollectorRegistry()
    requests = Counter(
        "mirrorgate_proxy_requests",
        "Requests answered, by backend role and HTTP status.",
        ("role", "code"),
        registry=registry,
    )
    duration = Histogram(
        "mirrorgate_proxy_request_duration_seconds",
        "Backend call latency by role.",
        ("role",),
        registry=registry,
    )
    dropped = Counter(
        "mirrorgate_shadow_dropped",
        "Shadow requests dropped instead of mirrored.",
        ("reason",),
        registry=registry,
    )
    failures = Counter(
        "mirrorgate_shadow_failures",
        "Shadow requests that failed at the candidate.",
        ("reason",),
        registry=registry,
    )
    in_flight = Gauge(
        "mirrorgate_shadow_in_flight", "Shadow requests in flight.", registry=registry
    )
    queue = Gauge("mirrorgate_shadow_queue_depth", "Shadow requests waiting.", registry=registry)
    batch = Histogram(
        "mirrorgate_batcher_batch_size",
        "Rows per micro-batch.",
        ("model",),
        buckets=(1, 2, 4, 8, 16, 32, 64),
        registry=registry,
    )
    written = Counter("mirrorgate_recorder_written", "Pair records written.", registry=registry)
    rec_dropped = Counter(
        "mirrorgate_recorder_dropped", "Pair records dropped.", ("reason",), registry=registry
    )
    buffer = Gauge(
        "mirrorgate_recorder_buffer_depth", "Pair records waiting to be written.", registry=registry
    )
    status = Gauge(
        "mirrorgate_gate_status",
        "Gate status: 0 pass, 1 inconclusive, 2 fail.",
        ("gate", "slice"),
        registry=registry,
    )
    statistic = Gauge(
        "mirrorgate_gate_statistic", "Gate statistic.", ("gate", "slice"), registry=registry
    )
    threshold = Gauge(
        "mirrorgate_gate_threshold", "Gate threshold.", ("gate", "slice"), registry=registry
    )
    verdict = Gauge(
        "mirrorgate_rollout_verdict", "1 on the current verdict.", ("verdict",), registry=registry
    )
    stage = Gauge(
        "mirrorgate_rollout_stage", "1 on the current stage.", ("stage",), registry=registry
    )
    weight = Gauge(
        "mirrorgate_rollout_canary_weight",
        "Share of live traffic the candidate serves.",
        registry=registry,
    )

    for role, seconds in (("champion", 0.004), ("candidate", 0.006)):
        requests.labels(role=role, code="200").inc(100)
        for _ in range(5):
            duration.labels(role=role).observe(seconds)
    requests.labels(role="champion", code="502").inc()
    dropped.labels(reason="queue_full").inc(3)
    failures.labels(reason="timeout").inc(2)
    in_flight.set(4)
    queue.set(12)
    for size in (1, 8, 32):
        batch.labels(model="champion").observe(size)
    written.inc(97)
    rec_dropped.labels(reason="buffer_full").inc(1)
    buffer.set(20)
    for slice_ in ("all", "platform=mobile"):
        status.labels(gate="tolerance", slice=slice_).set(1)
        statistic.labels(gate="tolerance", slice=slice_).set(0.012)
        threshold.labels(gate="tolerance", slice=slice_).set(0.02)
    for name in ("continue", "promote", "abort"):
        verdict.labels(verdict=name).set(1 if name == "continue" else 0)
    for name in ("shadow", "canary-5%", "canary-25%", "promote"):
        stage.labels(stage=name).set(1 if name == "shadow" else 0)
    weight.set(0.0)
    # the lifecycle's metrics, from the proxy's own class
    ops = OpsMetrics(registry)
    ops.set_rollout("r-0123456789ab", "6d4f7b9c8")
    ops.gate_blocking_status.labels(gate="tolerance", slice="all").set(1)
    ops.identity_changes.labels(action="refused").inc()
    ops.live_duration.labels(code_class="2xx").observe(0.004)
    ops.labels.labels(status="joined").inc(3)
    ops.labels_unmatched.set(0)
    registry.register(DroppedLogRecords())  # the proxy's own collector
    return registry
