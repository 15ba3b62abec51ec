"""The aiohttp application: Open Inference Protocol routes, errors, lifecycle.

``create_app(config, ...)`` builds it; state lives under the ``STATE`` AppKey. A
``cleanup_ctx`` owns the lifecycle: sinks start, backends load (in the background, so
liveness answers and readiness says 503 while models load), and on shutdown readiness
turns 503, mirrored work drains (bounded by ``server.shutdown_timeout_s``), backends
close (injected ones too: the app takes ownership), then sinks close (which flushes).

Every error leaves through one middleware as ``{"error": message}`` with its status:
:class:`MirrorgateError` subclasses carry theirs, aiohttp's own (404 route, 405, 413
body over ``server.max_body_bytes``) keep theirs, anything unexpected is a logged 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gates.engine import Evaluation
from proxy import __version__
from proxy.backends.base import Backend, ModelMetadata
from proxy.codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    error_body,
    metadata_to_dict,
    parse_infer_request,
    validate_request,
)
from proxy.config import BackendSettings, MirrorgateConfig
from proxy.errors import BadRequest, ConfigError, MirrorgateError, NotFound, NotReady
from proxy.limits import make_expect_handler, make_limits_middleware
from proxy.metrics import ProxyMetrics
from proxy.mirror import MirrorDispatcher
from proxy.persistence import Persistence
from proxy.rollout import RolloutService
from proxy.slicing import Slicer
from storage.entities import ModelInfo
from storage.sink import PairSink

log = logging.getLogger(__name__)

HARVESTER = "harvester"  # ProxyState.extras key of the proxy.harvest.Harvester
CONTROL_APP = "control_app"  # ProxyState.extras key of the control plane's own app
REQUEST_ID_HEADER = "X-Request-Id"
SERVED_BY_HEADER = "X-Mirrorgate-Served-By"
MAX_REQUEST_ID_LEN = 256
# Bodies/outputs larger than this are decoded/encoded in a worker thread.
OFFLOAD_BYTES = 1 << 20
SERVER_EXTENSIONS = ["binary_tensor_data"]


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
REQUEST_ID = web.RequestKey("mirrorgate_request_id", str)


# --------------------------------------------------------------------------- errors


def _error_response(status: int, message: str, request: web.Request) -> web.Response:
    headers = {"Content-Type": "application/json"}
    rid = request.get(REQUEST_ID) or request.headers.get(REQUEST_ID_HEADER)
    if isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID_LEN:
        headers[REQUEST_ID_HEADER] = rid
    return web.Response(status=status, body=error_body(message), headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except MirrorgateError as exc:
        response = _error_response(exc.status, exc.message, request)
        response.headers.update(exc.headers)  # e.g. WWW-Authenticate on a 401
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        state = request.app.get(STATE)
        if exc.status == 413 and state is not None:
            limit = state.config.server.max_body_bytes
            message = f"request body too large: the limit is {limit} bytes (server.max_body_bytes)"
        response = _error_response(exc.status, message or exc.reason, request)
        allow = exc.headers.get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # %r: the path is the client's bytes; escaped, it cannot forge log lines.
        log.exception("unhandled error on %s %r", request.method, request.raw_path)
        return _error_response(500, f"internal error: {type(exc).__name__}", request)


# --------------------------------------------------------------------------- handlers


def _check_model(state: ProxyState, request: web.Request) -> None:
    name = request.match_info["model"]
    served = state.config.server.model_name
    if name != served:
        raise NotFound(f"unknown model {name!r}; this server serves {served!r}")
    version = request.match_info.get("version")
    if version is not None and state.champion is not None:
        versions = state.champion.metadata.versions
        if version not in versions:
            raise NotFound(
                f"unknown version {version!r} of model {name!r}; versions: {', '.join(versions)}"
            )


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready or state.draining:
        raise NotReady(state.not_ready_reason())
    return web.json_response({"ready": True})


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "mirrorgate", "version": __version__, "extensions": SERVER_EXTENSIONS}
    )


async def model_metadata(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_model(state, request)
    metadata = state.require_metadata()
    return web.json_response(metadata_to_dict(metadata, name=state.config.server.model_name))


async def model_ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_model(state, request)
    if not state.ready or state.draining:
        raise NotReady(state.not_ready_reason())
    return web.json_response({"name": state.config.server.model_name, "ready": True})


def _request_id(parsed: InferRequest, request: web.Request) -> str:
    rid = parsed.id or request.headers.get(REQUEST_ID_HEADER, "").strip() or uuid.uuid4().hex
    if len(rid) > MAX_REQUEST_ID_LEN:
        raise BadRequest(f"request id is longer than {MAX_REQUEST_ID_LEN} characters")
    try:
        rid.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows a lone surrogate escape ("\ud800"); no database, log or header can
        # carry it, and the pair would be lost at the recorder: refuse it up front.
        raise BadRequest("request id is not valid Unicode text (lone surrogate)") from None
    if not rid.isprintable():
        # CR/LF, NUL, escapes: the id is echoed in a header, logged and stored.
        raise BadRequest("request id may contain printable characters only") from None
    return rid


async def _parse(request: web.Request) -> InferRequest:
    body = await request.read()  # raises 413 past client_max_size
    header_length = request.headers.get(HEADER_LENGTH)
    parse = functools.partial(
        parse_infer_request,
        allow_nonfinite=request.app[STATE].config.server.nonfinite_inputs,
    )
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse, body, header_length)
    return parse(body, header_length)


async def infer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    try:
        _check_model(state, request)
        mirror = state.require_mirror()
        parsed = await _parse(request)
        request_id = _request_id(parsed, request)
        request[REQUEST_ID] = request_id
        validate_request(parsed, state.require_metadata())
        slices = state.slicer.request_slices(request.headers, parsed.parameters)
    except (MirrorgateError, web.HTTPException) as exc:
        # Rejected before any model ran: live traffic answered on the champion's path.
        state.metrics.observe_call("champion", exc.status, None)
        raise
    sticky_header = config.mirror.sticky_header
    result = await mirror.infer(
        parsed.inputs,
        request_id=request_id,
        outputs=parsed.output_names(),
        slices=slices,
        sticky_key=request.headers.get(sticky_header) if sticky_header else None,
    )
    version = request.match_info.get("version")
    if version is None and state.champion is not None:
        version = state.champion.metadata.versions[0] if state.champion.metadata.versions else None
    encode = functools.partial(
        encode_infer_response,
        result.outputs,
        model_name=config.server.model_name,
        model_version=version,
        request_id=request_id,
        request=parsed,
    )
    if sum(np.asarray(a).nbytes for a in result.outputs.values()) > OFFLOAD_BYTES:
        body, header_length = await asyncio.to_thread(encode)
    else:
        body, header_length = encode()
    headers = {REQUEST_ID_HEADER: request_id, SERVED_BY_HEADER: result.served_by}
    if header_length is None:
        headers["Content-Type"] = "application/json"
    else:
        headers["Content-Type"] = "application/octet-stream"
        headers[HEADER_LENGTH] = str(header_length)
    return web.Response(body=body, headers=headers)


async def metrics_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.config.server.metrics_token is not None:
        from proxy.auth import check_bearer

        check_bearer(request, state.config.server.metrics_token)
    registry = state.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


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
    if state.rollout is not None and state.rollout.latest is not None:
        # An abort decided before serving (the pinned check at start) holds from the
        # first request on: the candidate is never mirrored.
        _apply_evaluation(state, state.rollout.latest)
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
                    from proxy.replicas import ReplicaCoordinator

                    # Before the store is attached, with no await in between: from here
                    # on this replica never evaluates or persists on its own (its gate
                    # loop may already be ticking while the models load).
                    state.rollout.coordinator = ReplicaCoordinator(
                        config, state.persistence, state.rollout
                    )
                state.rollout.store = state.persistence
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
    from proxy.harvest import Harvester

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


def _count_rejected(request: web.Request, status: int) -> None:
    # Refused at the boundary (size, coding, deadline) before any model ran: an infer
    # request is live traffic answered on the champion's path, as in infer().
    state = request.app.get(STATE)
    if state is not None and request.path.endswith("/infer"):
        state.metrics.observe_call("champion", status, None)


def add_data_plane_routes(app: web.Application) -> None:
    expect = make_expect_handler(app[STATE].config.server.max_body_bytes, _count_rejected)
    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    app.router.add_get("/v2", server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer, expect_handler=expect)
    if app[STATE].config.server.control_port is None:
        app.router.add_get("/metrics", metrics_endpoint)


def setup_control_plane(app: web.Application) -> None:
    from proxy.control import add_control_routes

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
) -> web.Application:
    """Build the proxy. Backends not injected are built from ``config.models``.

    ``storage``: record pairs, labels, evaluations and decisions in ``config.storage``
    (``serve`` and ``demo`` turn it on; tests inject sinks instead). ``gates``: run the
    rollout engine on the pairs when a candidate is configured or injected.
    """
    if config.replicas.enabled and not storage:
        raise ConfigError("replicas.enabled needs the shared database: run with storage on")
    registry = registry if registry is not None else CollectorRegistry()
    limits = make_limits_middleware(
        config.server.limits, config.server.max_body_bytes, on_reject=_count_rejected
    )
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[error_middleware, limits]
    )
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
    if config.server.control_port is None:
        setup_control_plane(app)
    else:
        state.extras[CONTROL_APP] = _control_app(state)
    return app


def _control_app(state: ProxyState) -> web.Application:
    """The control plane's own application (``server.control_port``): /v1/... and
    /metrics, sharing the data app's state; ``serve`` gives it its own listener. The
    data app owns the lifecycle; this one has none."""
    server = state.config.server
    limits = make_limits_middleware(server.limits, server.max_body_bytes)
    control = web.Application(
        client_max_size=server.max_body_bytes, middlewares=[error_middleware, limits]
    )
    control[STATE] = state
    setup_control_plane(control)
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


async def wait_loaded(app: web.Application) -> None:
    """Wait until the backends are loaded (re-raises a load failure)."""
    state = app[STATE]
    if state.loading is not None:
        await asyncio.shield(state.loading)
