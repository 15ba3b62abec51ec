"""Pass-through in front of a remote champion (docs/proxy.md).

The client's request goes to the champion as it came: method, path (the served model's
name mapped to the upstream's), query, body bytes and end-to-end headers; the client
gets the champion's status, end-to-end headers and body bytes unchanged, whatever the
encoding (JSON, binary tensors, gzip/deflate). The live path reads only the model name
and version from the URL, the request id and the slice headers; the pair's request and
the champion's answer are decoded later, by the mirror, off the live path.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import context
from proxy.backends.http import HttpBackend, Reply, decompress
from proxy.codec import HEADER_LENGTH, decode_infer_response, parse_infer_request
from proxy.errors import MirrorgateError
from proxy.headers import Headers, client_request_headers
from proxy.ratelog import FailureLog

if TYPE_CHECKING:
    from proxy.mirror import MirrorDispatcher, _Job

log = logging.getLogger(__name__)
failures = FailureLog(log)

REQUEST_ID_HEADER = "X-Request-Id"
SERVED_BY_HEADER = "X-Mirrorgate-Served-By"
MAX_REQUEST_ID_LEN = 256


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
) -> tuple[Reply, web.Response]:
    """Send the client's request on to ``backend``; the reply and the client's response.
    ``headers``: the client's end-to-end headers when the caller has them already.

    Mirrorgate's own failures (unreachable upstream, deadline) raise and are logged."""
    if headers is None:
        headers = client_request_headers(request.headers)
    if body is None and request.body_exists:
        body = await request.read()
    try:
        reply = await backend.forward(
            request.method, upstream_path(request, served, backend), body, headers
        )
    except MirrorgateError as exc:
        failures.failure(backend.base_url, exc.status, exc.message)
        raise type(exc)(f"champion: {exc.message}", status=exc.status) from exc
    if reply.status >= 500:
        failures.failure(backend.base_url, reply.status, reply.body[:200].decode(errors="replace"))
    return reply, to_response(reply)


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
    reply_body: bytes
    reply_encoding: str | None
    reply_header_length: str | None
    parameter_slices: Callable[[Mapping[str, object]], dict[str, str]]

    def __call__(self, job: _Job) -> None:
        from proxy.mirror import _nbytes

        # The champion accepted this request: whatever it carries (a bare Infinity that
        # Triton reads) is the pair's input, not mirrorgate's to refuse here.
        parsed = parse_infer_request(self.body, self.header_length, allow_nonfinite=("*",))
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
) -> ExchangeDecoder:
    return ExchangeDecoder(
        body,
        header_length,
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
) -> web.Response:
    """A live infer request answered by the remote champion, mirrored when it succeeds."""
    body = await request.read()
    header_length = request.headers.get(HEADER_LENGTH)
    client_rid = request.headers.get(REQUEST_ID_HEADER, "").strip() or None
    # DESIGN's order: the body's id, else the header, else generated.
    rid = _usable_id(_peek_id(body, header_length)) or _usable_id(client_rid)
    rid = rid or uuid.uuid4().hex
    context.request_id.set(rid)
    headers = client_request_headers(request.headers)
    context.client_headers.set(headers)
    start = time.perf_counter()
    try:
        reply, response = await forward(request, backend, served, body, headers)
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
            decode=exchange_decoder(body, header_length, reply, parameter_slices),
        )
    return response
