"""The state every layer reaches through the ``STATE`` AppKey, and its ``extras`` keys.

Its own module, below the control plane and the composition root, so that the routes
of the control plane and the lifecycle read the state without importing the app that
builds it (that import ran in a circle: the app mounts the control routes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.core.config import MirrorgateConfig
from proxy.core.errors import NotReady
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.mirror import MirrorDispatcher
from proxy.dataplane.slicing import Slicer
from proxy.protocol.base import Backend, ModelMetadata
from storage.sink import PairSink

if TYPE_CHECKING:
    # Types only: the control plane fills these in; the data plane never calls it.
    from proxy.control.persistence import Persistence
    from proxy.control.rollout import RolloutService

HARVESTER = "harvester"  # ProxyState.extras key of the proxy.control.harvest.Harvester
STATS = "stats"  # ProxyState.extras key of the in-process proxy.dataplane.stats.ModelStats
CONTROL_APP = "control_app"  # ProxyState.extras key of the control plane's own app
HANDOFF = "shadow_handoff"  # ProxyState.extras key of a live process's ShadowChannel
# The shadow worker's: bytes -> bytes, its /metrics with every live process's pushed
# metrics merged in (server.workers > 1, proxy/shadow/worker.py)
LIVE_METRICS = "shadow_live_metrics"


@dataclass(slots=True)
class ProxyState:
    """Everything the handlers (and the control plane to come) reach through ``STATE``."""

    config: MirrorgateConfig
    registry: CollectorRegistry
    metrics: ProxyMetrics
    slicer: Slicer
    sinks: list[PairSink]
    champion: Backend | None = None
    candidate: Backend | None = None
    mirror: MirrorDispatcher | None = None
    ready: bool = False
    draining: bool = False
    loading: asyncio.Task[None] | None = None
    load_error: str | None = None
    # Room for what the control plane wires in (rollout engine, stores) without new keys.
    rollout: RolloutService | None = None
    persistence: Persistence | None = None
    use_storage: bool = False
    extras: dict[str, object] = field(default_factory=dict)

    def require_mirror(self) -> MirrorDispatcher:
        # While draining, requests that still arrive on open connections are served:
        # readiness already steers new traffic away, and refusing them would fail
        # requests the server has accepted.
        if self.mirror is None:
            raise NotReady(self.not_ready_reason())
        return self.mirror

    def not_ready_reason(self) -> str:
        if self.load_error:
            return f"not ready: model load failed: {self.load_error}"
        if self.draining:
            return "not ready: shutting down"
        return "not ready: models are loading"

    def require_metadata(self) -> ModelMetadata:
        if self.champion is None:
            raise NotReady(self.not_ready_reason())
        return self.champion.metadata


STATE = web.AppKey("mirrorgate_state", ProxyState)
