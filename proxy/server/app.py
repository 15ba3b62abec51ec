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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gates.engine import Evaluation
from proxy import __version__
from proxy.backends.http import HttpBackend
from proxy.control.persistence import Persistence
from proxy.control.rollout import RolloutService
from proxy.core import context
from proxy.core.config import BackendSettings, MirrorgateConfig
from proxy.core.errors import BadRequest, ConfigError, MirrorgateError, NotFound, NotReady
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane import passthrough
from proxy.dataplane.limits import (
    RAW_BODY_LIMIT,
    make_expect_handler,
    make_limits_middleware,
    request_body,
)
from proxy.dataplane.mirror import MirrorDispatcher, input_rows
from proxy.dataplane.slicing import Slicer
from proxy.dataplane.state import CONTROL_APP, HANDOFF, HARVESTER, STATE, STATS, ProxyState
from proxy.dataplane.stats import ModelStats
from proxy.protocol.base import Backend
from proxy.protocol.codec import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    error_body,
    metadata_to_dict,
    parse_infer_request,
    validate_request,
)
from proxy.protocol.headers import client_request_headers
from storage.entities import ModelInfo
from storage.sink import PairSink

if TYPE_CHECKING:
    from proxy.shadow.live import ShadowChannel

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
SERVED_BY_HEADER = "X-Mirrorgate-Served-By"
MAX_REQUEST_ID_LEN = 256
# Bodies/outputs larger than this are decoded/encoded in a worker thread.
OFFLOAD_BYTES = 1 << 20
SERVER_EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository"]
UNPERSISTED_HEADER = "X-Mirrorgate-Decisions-Unpersisted"
NOT_READY_HEADER = "X-Mirrorgate-Not-Ready"  # why, since Triton's not-ready body is empty


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
    # Triton's wording: tritonclient's examples and tools match on it.
    name = request.match_info["model"]
    served = state.config.server.model_name
    if name != served:
        raise NotFound(f"Request for unknown model: '{name}' is not found")
    version = request.match_info.get("version")
    if version is not None and state.champion is not None:
        versions = state.champion.metadata.versions
        if version not in versions:
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found")


def _remote(state: ProxyState) -> HttpBackend | None:
    """The champion when it is a V2 server: then its answers pass through."""
    return state.champion if isinstance(state.champion, HttpBackend) else None


def _canary_passthrough(state: ProxyState, request: web.Request) -> HttpBackend | None:
    """The remote candidate a canary request is forwarded to as it came, if it can read
    the request as sent (a binary-tensor request needs a candidate that takes them);
    else None, and the request is rebuilt for it (MirrorDispatcher.infer)."""
    candidate = state.candidate
    if not isinstance(candidate, HttpBackend):
        return None
    if HEADER_LENGTH in request.headers and not candidate.binary:
        return None
    return candidate


async def _forward(request: web.Request, backend: HttpBackend) -> web.StreamResponse:
    state = request.app[STATE]
    _, response = await passthrough.forward(request, backend, state.config.server.model_name)
    return response


def _not_ready(state: ProxyState) -> web.Response:
    # Triton answers not-ready with 400 and an empty body; the reason goes in a header.
    return web.Response(status=400, headers={NOT_READY_HEADER: state.not_ready_reason()})


async def health_live(request: web.Request) -> web.StreamResponse:
    remote = _remote(request.app[STATE])
    if remote is not None:
        return await _forward(request, remote)
    return web.Response(status=200)


async def health_ready(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.ready or state.draining:
        return _not_ready(state)
    remote = _remote(state)
    response = await _forward(request, remote) if remote is not None else web.Response(status=200)
    unpersisted = len(state.rollout.unpersisted) if state.rollout is not None else 0
    if unpersisted:
        # Still ready (the live path is fine), but a decision waits for the database: a
        # restart now would forget it. Said here (a header: Triton's health bodies are
        # empty), in the log, in the metrics and in GET /v1/rollout.
        response.headers[UNPERSISTED_HEADER] = str(unpersisted)
    return response


async def server_metadata(request: web.Request) -> web.StreamResponse:
    remote = _remote(request.app[STATE])
    if remote is not None:
        return await _forward(request, remote)
    return web.json_response(
        {"name": "mirrorgate", "version": __version__, "extensions": SERVER_EXTENSIONS}
    )


async def model_metadata(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    remote = _remote(state)
    if remote is not None:
        return await _forward(request, remote)
    _check_model(state, request)
    metadata = state.require_metadata()
    return web.json_response(metadata_to_dict(metadata, name=state.config.server.model_name))


async def model_ready(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    remote = _remote(state)
    if remote is not None and state.ready and not state.draining:
        return await _forward(request, remote)
    _check_model(state, request)
    if not state.ready or state.draining:
        return _not_ready(state)
    return web.Response(status=200)


async def model_stats(request: web.Request) -> web.StreamResponse:
    """Triton's statistics extension (in-process models: proxy/dataplane/stats.py)."""
    state = request.app[STATE]
    remote = _remote(state)
    if remote is not None:
        return await _forward(request, remote)
    stats = _stats(state)
    if "model" not in request.match_info:
        return web.json_response(stats.to_dict() if stats is not None else {"model_stats": []})
    _check_model(state, request)
    if stats is None:
        raise NotReady(state.not_ready_reason())
    return web.json_response(stats.to_dict(request.match_info.get("version")))


async def repository_index(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    remote = _remote(state)
    if remote is not None:
        return await _forward(request, remote)
    name = state.config.server.model_name
    versions = state.champion.metadata.versions if state.champion is not None else ("1",)
    status = "READY" if state.ready and not state.draining else "UNAVAILABLE"
    return web.json_response([{"name": name, "version": v, "state": status} for v in versions])


async def v2_other(request: web.Request) -> web.StreamResponse:
    """Anything else under /v2: the remote champion's answer, else 404."""
    remote = _remote(request.app[STATE])
    if remote is not None:
        return await _forward(request, remote)
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise NotFound(f"no such endpoint: {request.method} {request.path}")


def _stats(state: ProxyState) -> ModelStats | None:
    stats = state.extras.get(STATS)
    if stats is None and state.champion is not None:
        stats = ModelStats(state.config.server.model_name, state.champion.metadata.versions)
        state.extras[STATS] = stats
    return stats if isinstance(stats, ModelStats) else None


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


async def _parse(request: web.Request, body: bytes) -> InferRequest:
    header_length = request.headers.get(HEADER_LENGTH)
    parse = functools.partial(
        parse_infer_request,
        allow_nonfinite=request.app[STATE].config.server.nonfinite_inputs,
    )
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(parse, body, header_length)
    return parse(body, header_length)


async def infer(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    to_candidate: bool | None = None
    remote = _remote(state)
    if remote is not None:
        served = config.server.model_name
        if request.match_info["model"] != served:
            return await _forward(request, remote)  # another model of that server
        mirror = state.require_mirror()
        sticky_header = config.mirror.sticky_header
        to_candidate = mirror.routes_to_candidate(
            request.headers.get(sticky_header) if sticky_header else None
        )
        remote_candidate = _canary_passthrough(state, request) if to_candidate else None
        if remote_candidate is not None and not mirror.breaker.allow():
            # An open circuit sends canary requests to the champion (as MirrorDispatcher
            # .infer does): a dead candidate must not cost the live path its timeout.
            to_candidate, remote_candidate = False, None
        if not to_candidate or remote_candidate is not None:
            return await passthrough.infer(
                request,
                remote,
                mirror,
                served,
                state.slicer.request_slices(request.headers, {}),
                # picklable and small: it travels with each pair to the shadow worker
                state.slicer.parameter_slices,
                state.metrics.observe_champion,
                candidate=remote_candidate,
                observe_candidate=functools.partial(state.metrics.observe_call, "candidate"),
            )
    context.client_headers.set(client_request_headers(request.headers))
    t_start = time.perf_counter_ns()
    try:
        _check_model(state, request)
        mirror = state.require_mirror()
        body = await request_body(request)  # 413 past server.max_body_bytes, decoded too
        t_read = time.perf_counter_ns()
        parsed = await _parse(request, body)
        request_id = _request_id(parsed, request)
        request[REQUEST_ID] = request_id
        validate_request(parsed, state.require_metadata())
        slices = state.slicer.request_slices(request.headers, parsed.parameters)
    except (MirrorgateError, web.HTTPException) as exc:
        # Rejected before any model ran: live traffic answered on the champion's path.
        state.metrics.observe_call("champion", exc.status, None)
        raise
    sticky_header = config.mirror.sticky_header
    t_input = time.perf_counter_ns()
    stats = _stats(state)
    default_version = (stats.versions() or ("1",))[0] if stats is not None else "1"
    stats_version = request.match_info.get("version") or default_version
    try:
        result = await mirror.infer(
            parsed.inputs,
            request_id=request_id,
            outputs=parsed.output_names(),
            slices=slices,
            sticky_key=request.headers.get(sticky_header) if sticky_header else None,
            to_candidate=to_candidate,
        )
    except MirrorgateError as exc:
        if stats is not None:
            stats.failure(stats_version, time.perf_counter_ns() - t_start)
        if remote is not None and exc.status >= 500:  # a canary request's champion call
            passthrough.failures.failure(remote.base_url, exc.status, exc.message)
        raise
    t_infer = time.perf_counter_ns()
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
    if stats is not None and remote is None:
        stats.success(
            stats_version,
            rows=input_rows(parsed.inputs) or 1,
            queue_ns=t_read - t_start,
            input_ns=t_input - t_read,
            infer_ns=t_infer - t_input,
            output_ns=time.perf_counter_ns() - t_infer,
        )
    return web.Response(body=body, headers=headers)


async def metrics_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.config.server.metrics_token is not None:
        from proxy.dataplane.auth import check_bearer

        check_bearer(request, state.config.server.metrics_token)
    body = generate_latest(state.registry)
    channel = state.extras.get(HANDOFF)
    if channel is not None:  # a live process: the shadow worker's metrics merged in
        body = await channel.metrics_text(body)  # type: ignore[attr-defined]
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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
    app.router.add_get("/v2/models/stats", model_stats)
    app.router.add_post("/v2/repository/index", repository_index)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_get(prefix + "/stats", model_stats)
        app.router.add_post(prefix + "/infer", infer, expect_handler=expect)
    if app[STATE].config.server.control_port is None:
        app.router.add_get("/metrics", metrics_endpoint)
    # Last: everything else under /v2 goes to a remote champion as it came.
    app.router.add_route("*", "/v2/{tail:.*}", v2_other)


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
        config.server.limits, config.server.max_body_bytes, on_reject=_count_rejected
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
        # A live process: /v1 is forwarded to the shadow worker, which owns the rollout.
        state.extras[HANDOFF] = handoff
        handoff.install(app)
    elif config.server.control_port is None:
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
