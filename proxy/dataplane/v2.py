"""The data plane's V2 routes: health, metadata, statistics, repository, infer, metrics.

What a client of the Open Inference Protocol talks to. In front of a remote champion
every route passes the champion's answer through (proxy/dataplane/passthrough.py);
with in-process models mirrorgate is the server and answers as Triton does (empty
health bodies, 400 when not ready, Triton's wording for an unknown model, the
statistics extension). The composition root (proxy/server/app.py) mounts these routes
and owns the lifecycle; nothing here imports the control plane.

Every error leaves through :func:`error_middleware` as ``{"error": message}`` with its
status: :class:`MirrorgateError` subclasses carry theirs, aiohttp's own (404 route, 405,
413 body over ``server.max_body_bytes``) keep theirs, anything unexpected is a logged 500.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.backends.http import HttpBackend
from proxy.core import context
from proxy.core.errors import BadRequest, MirrorgateError, NotFound, NotReady
from proxy.dataplane import passthrough
from proxy.dataplane.limits import make_expect_handler, request_body
from proxy.dataplane.mirror import input_rows
from proxy.dataplane.state import HANDOFF, LIVE_METRICS, STATE, STATS, ProxyState
from proxy.dataplane.stats import ModelStats
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
    merge_lives = state.extras.get(LIVE_METRICS)
    if merge_lives is not None:  # the shadow worker: every live process's counters too
        body = merge_lives(body)  # type: ignore[operator]
    channel = state.extras.get(HANDOFF)
    if channel is not None:  # a live process: the shadow worker's metrics merged in
        body = await channel.metrics_text(  # type: ignore[attr-defined]
            body, request.headers.get("Authorization")
        )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------- routes


def count_rejected(request: web.Request, status: int) -> None:
    # Refused at the boundary (size, coding, deadline) before any model ran: an infer
    # request is live traffic answered on the champion's path, as in infer().
    state = request.app.get(STATE)
    if state is not None and request.path.endswith("/infer"):
        state.metrics.observe_call("champion", status, None)


def add_data_plane_routes(app: web.Application) -> None:
    expect = make_expect_handler(app[STATE].config.server.max_body_bytes, count_rejected)
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
