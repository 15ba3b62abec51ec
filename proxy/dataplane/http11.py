"""The HTTP/1.1 bytes the byte-level front reads and writes (proxy/dataplane/front.py).

:func:`read_head` reads a request head once (strict: None for anything odd);
:func:`parse_head` is the fast path's reading of it and :func:`relay_length` the relay's,
None for anything they are not sure of (the aiohttp app then judges the request). The response
helpers write what aiohttp's server writes for the same ``web.Response``: its framing,
and ``Content-Type``/``Date``/``Server``/``Connection`` only where they are missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from proxy.backends.http import Reply
from proxy.backends.rawhttp import RawReply
from proxy.dataplane.passthrough import MAX_REQUEST_ID_LEN
from proxy.protocol.codec import error_body
from proxy.protocol.headers import HOP_BY_HOP, REQUEST_FRAMING

_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e]*)")
# Model names the fast path maps in a path (unreserved URL characters only).
NAME = re.compile(r"[A-Za-z0-9._~-]+")
_INFER = re.compile(rb"/v2/models/([A-Za-z0-9._~-]+)(?:/versions/([A-Za-z0-9._~-]+))?/infer")
_HOP = frozenset(h.encode() for h in HOP_BY_HOP)
_FRAMING = frozenset(h.encode() for h in REQUEST_FRAMING)
_SERVER = SERVER_SOFTWARE.encode()
_REASONS = {200: b"OK", 408: b"Request Timeout", 500: b"Internal Server Error"}


@dataclass(slots=True)
class Request:
    """What the fast path read from a request head."""

    version10: bool
    keep_alive: bool
    path: bytes  # the path from /v2 on, the served name already mapped
    lines: list[bytes]  # end-to-end header lines the champion gets
    headers: tuple[tuple[str, str], ...]  # the same, as context.client_headers wants
    length: int
    header_length: str | None
    coding: str | None  # the client's Content-Encoding value
    request_id: str | None  # the client's X-Request-Id, as sent
    has_accept: bool


@dataclass(slots=True)
class Head:
    """A request head as both front paths read it (strictly: None for anything odd)."""

    method: bytes
    target: bytes
    version10: bool
    keep_alive: bool
    length: int  # -1: no Content-Length
    plain: bool  # no Transfer-Encoding, Expect or Upgrade: Content-Length framing only
    named: set[bytes]  # what its Connection header names (hop-by-hop for this request)
    fields: list[tuple[bytes, bytes, bytes]]  # (lower-case name, name, value)
    header_length: str | None
    coding: str | None
    request_id: str | None
    has_accept: bool


def read_head(head: bytes) -> Head | None:
    """A request head (without its blank line), or None where it is not plainly
    HTTP/1.x ``Name: value`` lines with at most one digit-only Content-Length."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if version == b"HTTP/1.1":
        version10 = False
    elif version == b"HTTP/1.0":
        version10 = True
    else:
        return None
    length = -1
    keep_alive = not version10
    plain = True
    named: set[bytes] = set()
    fields: list[tuple[bytes, bytes, bytes]] = []
    header_length = coding = request_id = None
    has_accept = False
    for line in lines[1:]:
        m = _HEADER.fullmatch(line)
        if m is None:
            return None
        name, value = m.group(1), m.group(2).strip(b" \t")
        lname = name.lower()
        if lname == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif lname in (b"transfer-encoding", b"expect", b"upgrade"):
            plain = False
        elif lname == b"connection":
            for token in value.lower().split(b","):
                token = token.strip(b" \t")
                if token == b"upgrade":
                    plain = False
                elif token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
                elif token:
                    named.add(token)
        elif lname == b"content-encoding":
            if coding is not None:
                return None
            coding = value.decode()
        elif lname == b"inference-header-content-length":
            if header_length is not None:
                return None
            header_length = value.decode()
        elif lname == b"x-request-id" and request_id is None:
            request_id = value.decode()
        elif lname == b"accept":
            has_accept = True
        fields.append((lname, name, value))
    return Head(
        method,
        target,
        version10,
        keep_alive,
        length,
        plain,
        named,
        fields,
        header_length,
        coding,
        request_id,
        has_accept,
    )


def parse_head(h: Head, served: bytes, model: bytes, max_body: int) -> Request | None:
    """The fast path's reading of a request head (:func:`read_head`), or None: anything
    it is not sure of goes to the aiohttp app, which judges it."""
    if h.method != b"POST" or not h.plain or h.length <= 0 or h.length > max_body:
        return None
    target = h.target
    match = _INFER.fullmatch(target)
    if match is None or match.group(1) != served or match.group(2) in (b".", b".."):
        return None
    path = b"/v2/models/" + model + target[11 + len(served) :]
    named = h.named
    kept = [
        (name, value)
        for lname, name, value in h.fields
        if lname not in _HOP and lname not in named and lname not in _FRAMING
    ]
    return Request(
        h.version10,
        h.keep_alive,
        path,
        [name + b": " + value for name, value in kept],
        tuple((name.decode(), value.decode()) for name, value in kept),
        h.length,
        h.header_length,
        h.coding,
        h.request_id,
        h.has_accept,
    )


def relay_length(h: Head) -> int | None:
    """The body length of a request the aiohttp app answers that the front can relay
    and then take the connection back (proxy/dataplane/front.py), or None: the
    connection is then spliced for good. Relayed: HTTP/1.1 keep-alive requests framed
    by Content-Length alone (or bodiless), whose answer is delimited by its own
    framing (not HEAD, whose answer has a length but no body; not CONNECT)."""
    if not h.plain or h.version10 or not h.keep_alive:
        return None
    if h.method in (b"HEAD", b"CONNECT"):
        return None
    return max(h.length, 0)


def response(
    version10: bool,
    status: int,
    reason: bytes,
    lines: list[bytes],
    body: bytes,
    keep_alive: bool,
    *,
    has_type: bool,
    has_date: bool,
    has_server: bool,
) -> bytes:
    """A response as aiohttp's server writes it for the same ``web.Response``: its own
    framing, and Content-Type/Date/Server/Connection only where they are missing."""
    out = [b"HTTP/1.0 " if version10 else b"HTTP/1.1 ", b"%d %s\r\n" % (status, reason)]
    for line in lines:
        out += (line, b"\r\n")
    empty = status in (204, 304) or 100 <= status < 200
    if not empty:
        out.append(b"Content-Length: %d\r\n" % len(body))
        if body and not has_type:
            out.append(b"Content-Type: application/octet-stream\r\n")
    if not has_date:
        out += (b"Date: ", rfc822_formatted_time().encode(), b"\r\n")
    if not has_server:
        out += (b"Server: ", _SERVER, b"\r\n")
    if keep_alive:
        if version10:
            out.append(b"Connection: keep-alive\r\n")
    elif not version10:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    if not empty:
        out.append(body)
    return b"".join(out)


def json_error(
    version10: bool, status: int, message: str, keep_alive: bool, request_id: str | None = None
) -> bytes:
    """``{"error": ...}`` as proxy/dataplane/v2.py's error_middleware answers it."""
    lines = [b"Content-Type: application/json"]
    if request_id is not None and 0 < len(request_id) <= MAX_REQUEST_ID_LEN:
        lines.append(b"X-Request-Id: " + request_id.encode())
    reason = _REASONS.get(status) or _reason(status)
    return response(
        version10,
        status,
        reason,
        lines,
        error_body(message),
        keep_alive,
        has_type=True,
        has_date=False,
        has_server=False,
    )


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def client_headers(reply: RawReply) -> tuple[list[bytes], set[bytes]]:
    """The champion's end-to-end header lines for the client (hop-by-hop, those its
    Connection names, its framing and a served-by of its own dropped), and the
    lower-case names kept."""
    named: set[bytes] = set()
    for name, value in reply.headers:
        if name.lower() == b"connection":
            named.update(t.strip(b" \t").lower() for t in value.split(b","))
    out: list[bytes] = []
    kept: set[bytes] = set()
    for name, value in reply.headers:
        lname = name.lower()
        if (
            lname in _HOP
            or lname in named
            or lname == b"content-length"
            or lname == b"x-mirrorgate-served-by"
        ):
            continue
        kept.add(lname)
        out.append(name + b": " + value)
    return out, kept


def as_reply(reply: RawReply) -> Reply:
    """The champion's answer as passthrough's :class:`Reply` (what the decoder reads)."""
    named = {
        t.strip(b" \t").lower()
        for name, value in reply.headers
        if name.lower() == b"connection"
        for t in value.split(b",")
    }
    headers = tuple(
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in reply.headers
        if name.lower() not in _HOP and name.lower() not in named
    )
    return Reply(reply.status, reply.reason.decode("latin-1"), headers, reply.body)
