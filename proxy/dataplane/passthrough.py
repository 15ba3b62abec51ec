"""Pass-through in front of a remote champion (docs/proxy.md).

The client's request goes to the champion as it came: method, path (the served model's
name mapped to the upstream's), query, body bytes and end-to-end headers; the client
gets the champion's status, end-to-end headers and body bytes unchanged, whatever the
encoding (JSON, binary tensors, gzip/deflate). The live path reads only the model name
and version from the URL, the request id and the slice headers; the pair's request and
the champion's answer are decoded later, by the mirror, off the live path.

A compressed request body (``Content-Encoding: gzip``, ``deflate``, any token) is
forwarded as the client's bytes with the client's ``Content-Encoding``: the champion
decodes it, or refuses it, as it would without mirrorgate. Mirrorgate decodes it only
for the pair (bounded by ``server.max_body_bytes``; a body it cannot decode drops the
pair as ``undecodable``), and on the live path only as far as the request id needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.backends.http import HttpBackend, Reply, decompress, upstream_message
from proxy.core import context
from proxy.core.errors import BackendError, MirrorgateError
from proxy.core.ratelog import FailureLog
from proxy.dataplane.limits import RAW_BODY_LIMIT, content_coding, decode_body
from proxy.protocol.codec import HEADER_LENGTH, decode_infer_response, parse_infer_request
from proxy.protocol.headers import Headers, candidate_passthrough_headers, client_request_headers

if TYPE_CHECKING:
    from proxy.dataplane.mirror import CallOutcome, MirrorDispatcher, _Job

log = logging.getLogger(__name__)
failures = FailureLog(log)

REQUEST_ID_HEADER = "X-Request-Id"
SERVED_BY_HEADER = "X-Mirrorgate-Served-By"
MAX_REQUEST_ID_LEN = 256
# Decoded bytes of a compressed JSON body searched for its id on the event loop; a
# longer body is decoded for its id in a worker thread.
PEEK_ON_LOOP = 1 << 20


def upstream_path(request: web.Request, served: str, backend: HttpBackend) -> str:
    """The request's path and query on the upstream: only the served model's name is
    mapped to the upstream's (``server.model_name`` -> ``models.champion.model``)."""
    path = request.raw_path
    prefix = f"/v2/models/{served}"
    if served != backend.model and (
        path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "?")
    ):
        path = f"/v2/models/{backend.model}" + path[len(prefix) :]
    return path


def to_response(reply: Reply) -> web.Response:
    """The upstream's answer as the client's: status, reason, headers, body bytes."""
    response = web.Response(status=reply.status, reason=reply.reason, body=reply.body)
    # web.Response sets a Content-Type of its own for a bytes body: the upstream's wins
    # (or none at all, as the upstream sent).
    response.headers.popall("Content-Type", None)
    for key, value in reply.headers:
        if key.lower() != "content-length":  # aiohttp frames the body it sends
            response.headers.add(key, value)
    return response


async def forward(
    request: web.Request,
    backend: HttpBackend,
    served: str,
    body: bytes | None = None,
    headers: Headers | None = None,
    role: str = "champion",
) -> tuple[Reply, web.Response]:
    """Send the client's request on to ``backend``; the reply and the client's response.

    ``headers``: the client's end-to-end headers to send (default: all of them).
    Mirrorgate's own failures (unreachable upstream, deadline) raise; the champion's are
    logged (a candidate's failure never reaches the client: the champion answers)."""
    if headers is None:
        headers = client_request_headers(request.headers)
    if body is None and request.body_exists:
        body = await request.read()
    headers += _body_coding(request, body)
    try:
        reply = await backend.forward(
            request.method, upstream_path(request, served, backend), body, headers
        )
    except MirrorgateError as exc:
        if role == "champion":
            failures.failure(backend.base_url, exc.status, exc.message)
        raise type(exc)(f"{role}: {exc.message}", status=exc.status) from exc
    if reply.status >= 500 and role == "champion":
        failures.failure(backend.base_url, reply.status, reply.body[:200].decode(errors="replace"))
    return reply, to_response(reply)


def _body_coding(request: web.Request, body: bytes | None) -> Headers:
    """The client's ``Content-Encoding``, sent on with the client's (raw) body bytes."""
    if not body or request.app.get(RAW_BODY_LIMIT) is None:
        return ()  # no body, or one aiohttp decoded already
    return tuple(("Content-Encoding", v) for v in request.headers.getall("Content-Encoding", ()))


async def _peek_id_coded(
    body: bytes, header_length: str | None, coding: str, limit: int
) -> str | None:
    """:func:`_peek_id` of a compressed body: a binary request's JSON header is decoded
    alone; a JSON body up to PEEK_ON_LOOP bytes here, past that in a worker thread.
    A body that does not decode has no id here (the champion judges it)."""
    try:
        if header_length is not None:
            if not (header_length.isascii() and header_length.isdigit()):
                return None
            stop = int(header_length)
            if stop > limit:
                return None
            return _peek_id(decode_body(body, coding, limit, stop=stop), header_length)
        head = decode_body(body, coding, limit, stop=PEEK_ON_LOOP + 1)
        if len(head) > PEEK_ON_LOOP:
            head = await asyncio.to_thread(decode_body, body, coding, limit)
        return _peek_id(head, None)
    except MirrorgateError:
        return None


def _peek_id(body: bytes, header_length: str | None) -> str | None:
    """The V2 ``id`` of a request body, reading as little as possible: the JSON header
    of a binary request; a JSON body only when it contains ``"id"`` at all."""
    try:
        if header_length is not None:
            doc = json.loads(body[: int(header_length)])
        elif b'"id"' in body:
            doc = json.loads(body)
        else:
            return None
    except (ValueError, UnicodeDecodeError):
        return None  # the champion judges the request; the pair id falls back
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and rid else None


def _usable_id(rid: str | None) -> str | None:
    if not rid or len(rid) > MAX_REQUEST_ID_LEN or not rid.isprintable():
        return None
    try:
        rid.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return rid


@dataclass(slots=True)
class ExchangeDecoder:
    """What the mirror runs off the live path to read the pair from the raw bytes.

    A plain picklable object (no closure, no live header objects): under
    ``shadow.process`` it travels to the shadow worker process, which then does the
    decoding, so the live process only forwarded bytes.
    """

    body: bytes
    header_length: str | None
    # The request body's Content-Encoding and the most it may decode to
    # (``server.max_body_bytes``): a bomb drops the pair, never fills memory.
    coding: str
    limit: int
    reply_body: bytes
    reply_encoding: str | None
    reply_header_length: str | None
    parameter_slices: Callable[[Mapping[str, object]], dict[str, str]]

    def __call__(self, job: _Job) -> None:
        from proxy.dataplane.mirror import _nbytes

        # The champion accepted this request: whatever it carries (a bare Infinity that
        # Triton reads) is the pair's input, not mirrorgate's to refuse here.
        body = decode_body(self.body, self.coding, self.limit)
        parsed = parse_infer_request(body, self.header_length, allow_nonfinite=("*",))
        payload = decompress(self.reply_body, self.reply_encoding)
        answer = decode_infer_response(payload, self.reply_header_length)
        job.inputs = parsed.inputs
        job.outputs = parsed.output_names()
        job.live.outputs = answer.outputs
        job.slices.update(self.parameter_slices(parsed.parameters))
        job.nbytes = max(job.nbytes, _nbytes(parsed.inputs))


def exchange_decoder(
    body: bytes,
    header_length: str | None,
    reply: Reply,
    parameter_slices: Callable[[Mapping[str, object]], dict[str, str]],
    coding: str = "",
    limit: int = 1 << 62,
) -> ExchangeDecoder:
    return ExchangeDecoder(
        body,
        header_length,
        coding,
        limit,
        reply.body,
        reply.header("Content-Encoding"),
        reply.header(HEADER_LENGTH),
        parameter_slices,
    )


async def infer(
    request: web.Request,
    backend: HttpBackend,
    mirror: MirrorDispatcher,
    served: str,
    slices: Mapping[str, str],
    parameter_slices: Callable[[Mapping[str, object]], dict[str, str]],
    observe: Callable[[int, float], None],
    *,
    candidate: HttpBackend | None = None,
    observe_candidate: Callable[[int, float], None] | None = None,
) -> web.Response:
    """A live infer request answered by the remote champion, mirrored when it succeeds.

    ``candidate``: a canary request routed to this remote candidate. It is forwarded to
    the candidate as it came and the client gets the candidate's answer unchanged; the
    champion is called for the pair off the live path. A candidate that fails it (no
    answer, or a status other than 200) is invisible to the client: the request goes to
    the champion as above, and the pair records the candidate's failure."""
    body = await request.read()  # as it came: compressed bodies stay compressed
    header_length = request.headers.get(HEADER_LENGTH)
    client_rid = request.headers.get(REQUEST_ID_HEADER, "").strip() or None
    limit = request.app.get(RAW_BODY_LIMIT)
    coding = content_coding(request.headers.get("Content-Encoding")) if limit else ""
    # DESIGN's order: the body's id, else the header, else generated.
    if coding and limit is not None:
        body_rid = await _peek_id_coded(body, header_length, coding, limit)
    else:
        body_rid = _peek_id(body, header_length)
    rid = _usable_id(body_rid) or _usable_id(client_rid)
    rid = rid or uuid.uuid4().hex
    context.request_id.set(rid)
    client_headers = client_request_headers(request.headers)
    context.client_headers.set(client_headers)

    def decoder(reply: Reply) -> ExchangeDecoder:
        return exchange_decoder(
            body, header_length, reply, parameter_slices, coding, limit or len(body)
        )

    failed: CallOutcome | None = None
    if candidate is not None:
        headers = candidate_passthrough_headers(client_headers, candidate.settings)
        start = time.perf_counter()
        try:
            reply, response = await forward(
                request, candidate, served, body, headers, role="candidate"
            )
            error: MirrorgateError | None = None
            if reply.status != 200:
                said = upstream_message(reply.status, reply.body)
                error = BackendError(
                    f"upstream {candidate.model!r} answered {said}",
                    status=400 if reply.status == 400 else 502,
                )
        except MirrorgateError as exc:
            error = exc
        except asyncio.CancelledError:
            mirror.breaker.cancelled()  # the probe allow() gave ended without an outcome
            raise
        latency = time.perf_counter() - start
        if observe_candidate is not None:
            observe_candidate(error.status if error is not None else 200, latency)
        if error is None:
            mirror.breaker.record(True)
            if REQUEST_ID_HEADER not in response.headers:
                response.headers[REQUEST_ID_HEADER] = rid
            response.headers[SERVED_BY_HEADER] = "candidate"
            mirror.mirror_exchange(
                rid,
                slices=slices,
                latency_s=latency,
                nbytes=len(body) + len(reply.body),
                decode=decoder(reply),
                offload=bool(coding),
                served_by="candidate",
            )
            return response
        failed = mirror.canary_failed(error, latency)
    start = time.perf_counter()
    try:
        reply, response = await forward(request, backend, served, body, client_headers)
    except MirrorgateError as exc:
        observe(exc.status, time.perf_counter() - start)
        raise
    latency = time.perf_counter() - start
    observe(reply.status, latency)
    if REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = rid
    response.headers[SERVED_BY_HEADER] = "champion"
    if reply.status == 200:
        mirror.mirror_exchange(
            rid,
            slices=slices,
            latency_s=latency,
            nbytes=len(body) + len(reply.body),
            decode=decoder(reply),
            # Decompressing is work whatever the raw size: off the loop that runs it.
            offload=bool(coding),
            other=failed,
        )
    return response
