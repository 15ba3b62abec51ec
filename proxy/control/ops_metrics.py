"""Operations metrics of the rollout lifecycle, on the registry passed in.

* ``mirrorgate_build_info{version, rollout_id, revision}`` 1: what runs and judges what.
* ``mirrorgate_gate_blocking_status{gate, slice}``: ``mirrorgate_gate_status`` for the
  blocking cells only (0 pass, 1 inconclusive, 2 fail). Alerts and Flagger's metric read
  this one: an advisory gate (``metric.ece``) must never roll a candidate back.
* ``mirrorgate_rollout_decisions_unpersisted``: decisions waiting for the database (a
  restart now would forget them); ``mirrorgate_rollout_decision_persist_failures_total``.
* ``mirrorgate_rollout_identity_changes_total{action}``: the candidate's identity changed
  on the wire (``refused`` or ``new_rollout``).
* ``mirrorgate_proxy_live_duration_seconds``: end-to-end latency of live inference
  requests as the client sees it (parse, champion, encode), by HTTP status class.
* ``mirrorgate_labels_total{status}``: labels received (``joined`` at once, ``pending``)
  and ``mirrorgate_labels_unmatched`` (labels that never met their pair).
* The standard process, platform and GC collectors.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from gates.engine import Evaluation
from proxy import __version__
from proxy.core.metrics import LATENCY_BUCKETS

_ = GC_COLLECTOR  # the global one stays on the global registry; ours is per registry


class OpsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Gauge(
            "mirrorgate_build_info",
            "1 for the running version, its current rollout id and candidate revision.",
            ["version", "rollout_id", "revision"],
            registry=registry,
        )
        self.gate_blocking_status = Gauge(
            "mirrorgate_gate_blocking_status",
            "Status of blocking gate cells only: 0 pass, 1 inconclusive, 2 fail.",
            ["gate", "slice"],
            registry=registry,
        )
        self.unpersisted = Gauge(
            "mirrorgate_rollout_decisions_unpersisted",
            "Rollout decisions not yet written to the database (retried every tick).",
            registry=registry,
        )
        self.persist_failures = Counter(
            "mirrorgate_rollout_decision_persist_failures",
            "Failed attempts to write a rollout decision.",
            registry=registry,
        )
        self.identity_changes = Counter(
            "mirrorgate_rollout_identity_changes",
            "Candidate identity changes seen on the wire, by what was done.",
            ["action"],
            registry=registry,
        )
        self.live_duration = Histogram(
            "mirrorgate_proxy_live_duration_seconds",
            "End-to-end latency of live inference requests, by status class.",
            ["code_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.labels = Counter(
            "mirrorgate_labels",
            "Labels received, by join status at arrival (joined | pending | not_gated).",
            ["status"],
            registry=registry,
        )
        self.labels_unmatched = Gauge(
            "mirrorgate_labels_unmatched",
            "Labels that never met their pair within storage.label_window_s (this rollout).",
            registry=registry,
        )
        self._build: tuple[str, str] | None = None
        self._blocking: set[tuple[str, str]] = set()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            try:
                collector(registry=registry)
            except ValueError:
                pass  # already on this registry (a second app on one registry)

    def set_rollout(self, rollout_id: str, revision: str) -> None:
        if self._build is not None:
            self.build_info.remove(__version__, *self._build)
        self._build = (rollout_id, revision)
        self.build_info.labels(__version__, rollout_id, revision).set(1)

    def evaluated(self, evaluation: Evaluation) -> None:
        cells = set()
        for g in evaluation.gates:
            if g.blocking:
                cells.add((g.name, g.slice))
                self.gate_blocking_status.labels(g.name, g.slice).set(float(g.status.code))
        for gone in self._blocking - cells:
            self.gate_blocking_status.remove(*gone)
        self._blocking = cells

    # DecisionObserver (proxy.control.rollout)
    def decisions_unpersisted(self, n: int) -> None:
        self.unpersisted.set(n)

    def decision_persist_failed(self) -> None:
        self.persist_failures.inc()
