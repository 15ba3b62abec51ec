"""The composition root: ``create_app`` assembles the data plane, the control plane
and the shadow hand-off into one aiohttp application, and owns its lifecycle.

``create_app(config, ...)`` builds it; state lives under the ``STATE`` AppKey
(proxy/dataplane/state.py). The V2 routes are the data plane's (proxy/dataplane/v2.py);
the /v1 routes the control plane's (proxy/control/routes.py). A ``cleanup_ctx`` owns
the lifecycle: sinks start, backends load (in the background, so liveness answers and
readiness says not ready while models load), and on shutdown readiness turns not
ready, mirrored work drains (bounded by ``server.shutdown_timeout_s``), backends close
(injected ones too: the app takes ownership), then sinks close (which flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from gates.engine import Evaluation
from proxy.control.persistence import Persistence
from proxy.control.rollout import RolloutService
from proxy.core.config import BackendSettings, MirrorgateConfig
from proxy.core.errors import ConfigError, MirrorgateError
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.limits import (
    RAW_BODY_LIMIT,
    make_limits_middleware,
)
from proxy.dataplane.mirror import MirrorDispatcher
from proxy.dataplane.slicing import Slicer
from proxy.dataplane.state import CONTROL_APP, HANDOFF, HARVESTER, STATE, ProxyState
from proxy.dataplane.v2 import (
    add_data_plane_routes,
    count_rejected,
    error_middleware,
    metrics_endpoint,
)
from proxy.protocol.base import Backend
from storage.entities import ModelInfo
from storage.sink import PairSink

if TYPE_CHECKING:
    from proxy.shadow.live import ShadowChannel

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- lifecycle


def _activate(state: ProxyState) -> None:
    assert state.champion is not None
    state.mirror = MirrorDispatcher(
        champion=state.champion,
        candidate=state.candidate,
        config=state.config,
        sinks=state.sinks,
        metrics=state.metrics,
        slicer=state.slicer,
    )
    if state.rollout is not None:
        state.rollout.never_paired = state.mirror.never_paired
    if state.rollout is not None and state.rollout.latest is not None:
        # An abort decided before serving (the pinned check at start) holds from the
        # first request on: the candidate is never mirrored.
        _apply_evaluation(state, state.rollout.latest)
    channel = state.extras.get(HANDOFF)
    if channel is not None:
        # Mirrored work goes to the shadow worker; ready once the worker is.
        channel.attach(state)  # type: ignore[attr-defined]
    else:
        state.ready = True
    log.info(
        "serving %r: champion %s%s",
        state.config.server.model_name,
        state.champion.identity.name,
        f", candidate {state.candidate.identity.name}" if state.candidate else "",
    )


async def _build_backend(settings: BackendSettings, registry: CollectorRegistry) -> Backend:
    from proxy.backends import factory

    # The batching wrapper may take the registry for its histogram (backends' work);
    # pass it when the factory accepts it so the wiring needs no change after the merge.
    create: Callable[..., Awaitable[Backend]] = factory.create_backend
    if "registry" in inspect.signature(create).parameters:
        return await create(settings, registry=registry)
    return await create(settings)


async def _load(state: ProxyState) -> None:
    config = state.config
    created: list[Backend] = []
    try:
        if state.champion is None:
            state.champion = await _build_backend(config.models.champion, state.registry)
            created.append(state.champion)
        if state.candidate is None and config.models.candidate is not None:
            state.candidate = await _build_backend(config.models.candidate, state.registry)
            created.append(state.candidate)
        if state.persistence is not None:
            recorder = await state.persistence.attach(state.champion, state.candidate)
            state.sinks.append(recorder)
            if state.rollout is not None:
                if config.replicas.enabled:
                    from proxy.control.replicas import ReplicaCoordinator

                    # Before the store is attached, with no await in between: from here
                    # on this replica never evaluates or persists on its own (its gate
                    # loop may already be ticking while the models load).
                    state.rollout.coordinator = ReplicaCoordinator(
                        config, state.persistence, state.rollout
                    )
                    # A (re)started replica serves the fleet's decision from its first
                    # request: stage, canary weight, verdict (applied by _activate).
                    await state.rollout.coordinator.join()
                state.rollout.store = state.persistence
                # A restart resumes the rollout (stage, evidence, verdict: an abort holds)
                # before the first request is served.
                await state.rollout.resume()
                await _start_harvest(state)
        _activate(state)
        if state.rollout is not None and state.rollout.coordinator is not None:
            # after the mirror exists: the shared canary weight applies from the first sync
            await state.rollout.coordinator.start()
    except BaseException as exc:
        for backend in created:
            with contextlib.suppress(Exception):
                await backend.aclose()
        state.champion = state.candidate = None
        state.load_error = exc.message if isinstance(exc, MirrorgateError) else repr(exc)
        if not isinstance(exc, asyncio.CancelledError):
            log.error("model load failed: %s", state.load_error)
        raise


async def _start_harvest(state: ProxyState) -> None:
    """Harvest rules and the pinned gate (docs/pinned.md): before the mirror activates,
    the candidate runs over the pinned set; a miss aborts before any traffic."""
    from proxy.control.harvest import Harvester

    persistence, service = state.persistence, state.rollout
    assert persistence is not None and service is not None
    harvester = Harvester(
        persistence.store,
        state.config.gates.harvest,
        task=state.config.server.model_name,
        gate_task=service.engine.task,
        rollout_id=persistence.rollout.id if persistence.rollout else None,
        champion=ModelInfo.of(state.champion.identity) if state.champion else None,
        candidate=ModelInfo.of(state.candidate.identity) if state.candidate else None,
        recorder=persistence.recorder,
        output_name=state.config.output.output,
        registry=state.registry,
    )
    state.extras[HARVESTER] = harvester
    service.hooks.append(harvester)
    cases = await asyncio.to_thread(harvester.load_pinned)
    if cases and state.candidate is not None and state.config.gates.pinned.enabled:
        await harvester.check_candidate(state.candidate, service, cases)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.use_storage:
        # Before anything serves: a schema the code cannot use stops the start here.
        state.persistence = await Persistence.open(state.config, state.registry)
    for sink in state.sinks:
        await sink.start()
    needs_load = state.champion is None or (
        state.candidate is None and state.config.models.candidate is not None
    )
    if needs_load:
        state.loading = asyncio.get_running_loop().create_task(_load(state))
    else:
        if state.use_storage:
            state.loading = asyncio.get_running_loop().create_task(_load(state))
        else:
            _activate(state)
    try:
        yield
    finally:
        await _shutdown(state)


async def _shutdown(state: ProxyState) -> None:
    state.draining = True
    timeout = state.config.server.shutdown_timeout_s
    if state.loading is not None and not state.loading.done():
        state.loading.cancel()
    if state.loading is not None:
        with contextlib.suppress(BaseException):
            await state.loading
    if state.mirror is not None:
        await state.mirror.drain(timeout)
    for backend in (state.candidate, state.champion):
        if backend is not None:
            try:
                await backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", backend.identity.name)
    for sink in state.sinks:
        try:
            await sink.aclose()
        except Exception:
            log.exception("closing pair sink %r failed", sink)
    harvester = state.extras.get(HARVESTER)
    if harvester is not None:
        try:
            await harvester.aclose()  # type: ignore[attr-defined]
        except Exception:
            log.exception("closing the harvester failed")
    if state.persistence is not None:
        try:
            await state.persistence.aclose()
        except Exception:
            log.exception("closing the database failed")


async def _on_shutdown(app: web.Application) -> None:
    # First step of a graceful stop (before in-flight requests are awaited): readiness
    # answers 503 from here on.
    app[STATE].draining = True


# --------------------------------------------------------------------------- assembly


def setup_control_plane(app: web.Application) -> None:
    from proxy.control.routes import add_control_routes

    add_control_routes(app)


def create_app(
    config: MirrorgateConfig,
    *,
    champion: Backend | None = None,
    candidate: Backend | None = None,
    sinks: Sequence[PairSink] = (),
    registry: CollectorRegistry | None = None,
    storage: bool = False,
    gates: bool = True,
    handoff: ShadowChannel | None = None,
) -> web.Application:
    """Build the proxy. Backends not injected are built from ``config.models``.

    ``storage``: record pairs, labels, evaluations and decisions in ``config.storage``
    (``serve`` and ``demo`` turn it on; tests inject sinks instead). ``gates``: run the
    rollout engine on the pairs when a candidate is configured or injected. ``handoff``:
    a live process of ``mirrorgate serve`` (proxy/shadow/): mirrored work, gates, storage
    and the control plane are the shadow worker's, reached through this channel.
    """
    if handoff is not None:
        storage = gates = False
    elif config.replicas.enabled and not storage:
        raise ConfigError("replicas.enabled needs the shared database: run with storage on")
    registry = registry if registry is not None else CollectorRegistry()
    limits = make_limits_middleware(
        config.server.limits, config.server.max_body_bytes, on_reject=count_rejected
    )
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[error_middleware, limits],
        # Bodies are read as they came: a remote champion gets the client's compressed
        # bytes with their Content-Encoding; mirrorgate decodes only what it reads itself
        # (proxy.dataplane.limits.request_body), bounded, and the pair's copy off the live path.
        handler_args={"auto_decompress": False},
    )
    app[RAW_BODY_LIMIT] = config.server.max_body_bytes
    app[STATE] = ProxyState(
        config=config,
        registry=registry,
        metrics=ProxyMetrics(registry),
        slicer=Slicer(config.slices, config.features),
        sinks=list(sinks),
        champion=champion,
        candidate=candidate,
        use_storage=storage,
    )
    state = app[STATE]
    if gates and (candidate is not None or config.models.candidate is not None):
        state.rollout = RolloutService(
            config, metrics=state.metrics, apply=functools.partial(_apply_evaluation, state)
        )
        state.sinks.append(state.rollout)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    add_data_plane_routes(app)
    if handoff is not None:
        # A live process: /v1 is forwarded to the shadow worker, which owns the rollout
        # (on the data port, or on the control listener with server.control_port).
        state.extras[HANDOFF] = handoff
        handoff.install(app)
        if config.server.control_port is not None:
            state.extras[CONTROL_APP] = _control_app(state, forward=handoff.forward_control)
    elif config.server.control_port is None:
        setup_control_plane(app)
    else:
        state.extras[CONTROL_APP] = _control_app(state)
    return app


def _control_app(
    state: ProxyState,
    forward: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> web.Application:
    """The control plane's own application (``server.control_port``): /v1/... and
    /metrics, sharing the data app's state; ``serve`` gives it its own listener. The
    data app owns the lifecycle; this one has none.

    ``forward``: a live process in split mode (proxy/shadow/): /v1/... goes to the
    shadow worker's control plane as it came (the worker checks the tokens, by the same
    rules), and /metrics merges the worker's metrics into this process's."""
    server = state.config.server
    limits = make_limits_middleware(server.limits, server.max_body_bytes)
    control = web.Application(
        client_max_size=server.max_body_bytes, middlewares=[error_middleware, limits]
    )
    control[STATE] = state
    if forward is None:
        setup_control_plane(control)
    else:
        control.router.add_route("*", "/v1/{tail:.*}", forward)
    control.router.add_get("/metrics", metrics_endpoint)
    return control


def _apply_evaluation(state: ProxyState, evaluation: Evaluation) -> None:
    """The rollout plan owns routing: each evaluation sets the stage's canary weight."""
    if state.mirror is not None:
        state.mirror.set_canary_weight(evaluation.canary_weight)
        state.mirror.set_stage(evaluation.stage)
        if evaluation.verdict == "abort" and not state.config.mirror.shadow_after_abort:
            # An aborted candidate gets no more traffic, mirrored or served (unless the
            # operator asked to keep collecting evidence: the weight is 0 either way).
            state.mirror.stop_candidate()
        lifecycle = state.config.lifecycle
        if (
            evaluation.verdict == "promote"
            and evaluation.canary_weight == 0
            and not lifecycle.mirror_after_promote
        ):
            # Promoted: the controller now replaces the stable service and scales the
            # canary down; a candidate that is gone must cost nothing per request.
            state.mirror.stop_candidate()


async def wait_loaded(app: web.Application) -> None:
    """Wait until the backends are loaded (re-raises a load failure)."""
    state = app[STATE]
    if state.loading is not None:
        await asyncio.shield(state.loading)
