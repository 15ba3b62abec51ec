"""Server limits in front of the handlers, like nginx's and Envoy's defaults.

What a slow or hostile client can hold is bounded, and refusing it costs little:

* ``keepalive_timeout_s``: a connection that sends nothing, or only part of a request
  line or of its headers, is closed after this long (aiohttp's keep-alive timer runs
  from the moment a connection opens and while a request head is incomplete; nginx's
  ``client_header_timeout`` and ``keepalive_timeout``).
* ``body_timeout_s``: the whole body must arrive within this long, else 408 and the
  connection closes (nginx's ``client_body_timeout``, Envoy's ``request_timeout``). The
  body is read here, before the route; the handler's own read gets it from the cache.
* A declared ``Content-Length`` above ``server.max_body_bytes`` is answered 413 before
  a byte of the body is read, and ``Expect: 100-continue`` with such a length gets 413
  instead of ``100 Continue`` (any other expectation: 417).
* Request bodies are read as they came (the data app turns aiohttp's decompression
  off): in front of a remote champion the compressed bytes and their
  ``Content-Encoding`` are passed on unchanged, and mirrorgate decodes them only for the
  pair, off the live path. Where mirrorgate itself reads a body (an in-process champion,
  the control plane) :func:`request_body` decodes it, bounded: a ``Content-Encoding``
  other than identity, gzip, deflate (br, zstd when aiohttp can decode them) is a 415,
  a body that does not decode as its declared coding a 400, a body that decodes past
  ``server.max_body_bytes`` (a decompression bomb) a 413, with memory bounded by that
  limit.
* ``max_connections``: open connections past this are shed at accept time with a
  minimal 503 (``Connection: close``) and counted in
  ``mirrorgate_server_connections_shed_total``, so descriptors never run out (the
  default keeps half of ``RLIMIT_NOFILE`` for upstream sockets, the database and logs).
* :class:`RateLimitFilter` caps repeated log lines per logger and message (aiohttp's
  server and access loggers, asyncio's "accept failed" line), with a summary of what
  was suppressed: a flood of one error must not write megabytes of log.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD, BrotliDecompressor, ZSTDDecompressor
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter

from proxy.core.errors import BadRequest, MirrorgateError, PayloadTooLarge
from proxy.core.inflate import GZIP_WBITS, TooLarge, deflate_wbits, inflate
from proxy.core.runtime_settings import ServerLimits

log = logging.getLogger(__name__)

ENCODINGS = {"identity", "gzip", "x-gzip", "deflate"} | ({"br"} if HAS_BROTLI else set())
ENCODINGS |= {"zstd"} if HAS_ZSTD else set()
# Present on an app that reads request bodies raw (aiohttp's decompression off): the
# limit, in decoded bytes, that request_body() applies.
RAW_BODY_LIMIT = web.AppKey("mirrorgate_raw_body_limit", int)
_DECODED = web.RequestKey("mirrorgate_decoded_body", bytes)
# Loggers whose lines a client can trigger at will.
NOISY_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "asyncio")


class LimitError(MirrorgateError):
    """408/415/417: the statuses MirrorgateError's subclasses do not name."""


def content_coding(value: str | None) -> str:
    """The normalised ``Content-Encoding`` ("" for none or identity)."""
    coding = (value or "").strip().lower()
    return "" if coding == "identity" else coding


def _unsupported(coding: str) -> LimitError:
    return LimitError(
        f"unsupported Content-Encoding {coding[:40]!r}; accepted: " + ", ".join(sorted(ENCODINGS)),
        status=415,
    )


def _too_large_decoded(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body too large: the limit is {limit} bytes (server.max_body_bytes), decompressed"
    )


def decode_body(raw: bytes, coding: str | None, limit: int, *, stop: int | None = None) -> bytes:
    """A request body decoded from its ``Content-Encoding``.

    Raises 415 (unknown coding), 400 (not that coding), 413 (decodes past ``limit``).
    ``stop``: only the first ``stop`` bytes are wanted (the rest is not decoded)."""
    name = content_coding(coding)
    if not name or not raw:
        return raw if stop is None else raw[:stop]
    if name not in ENCODINGS:
        raise _unsupported(name)
    try:
        if name in ("gzip", "x-gzip"):
            return inflate(raw, GZIP_WBITS, limit, stop)
        if name == "deflate":
            return inflate(raw, deflate_wbits(raw), limit, stop)
        # br/zstd: aiohttp's own decoders, capped one byte past the limit.
        decoder = BrotliDecompressor() if name == "br" else ZSTDDecompressor()
        out = decoder.decompress_sync(raw, max_length=limit + 1)
    except TooLarge as exc:
        raise _too_large_decoded(limit) from exc
    except Exception as exc:
        raise BadRequest(f"request body does not decode as Content-Encoding {name!r}") from exc
    if len(out) > limit:
        raise _too_large_decoded(limit)
    return out if stop is None else out[:stop]


async def request_body(request: web.Request) -> bytes:
    """The body of a request mirrorgate reads itself, decoded from its coding (bounded,
    in a worker thread: a bomb must not hold the event loop)."""
    limit = request.app.get(RAW_BODY_LIMIT)
    if limit is None:  # aiohttp decoded it already (an app with decompression on)
        return await request.read()
    cached = request.get(_DECODED)
    if cached is not None:
        return cached
    raw = await request.read()
    coding = content_coding(request.headers.get("Content-Encoding"))
    body = await asyncio.to_thread(decode_body, raw, coding, limit) if coding and raw else raw
    request[_DECODED] = body
    return body


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, (soft - 64) // 2)


def _declared_length(request: web.BaseRequest) -> int | None:
    raw = request.headers.get("Content-Length")
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        # aiohttp's parser refuses these first; kept for other front ends.
        raise BadRequest("Content-Length must be ASCII digits")
    return int(text)


def _too_large(limit: int, length: int) -> str:
    return (
        f"request body too large: the limit is {limit} bytes (server.max_body_bytes), "
        f"Content-Length says {length}"
    )


OnReject = Callable[[web.Request, int], None]


def make_expect_handler(
    max_body_bytes: int, on_reject: OnReject | None = None
) -> Callable[[web.Request], Any]:
    """A route's ``expect_handler``: 413/417 (JSON) instead of ``100 Continue`` when the
    request would be refused anyway, so the client never sends the body."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        from proxy.protocol.codec import error_body

        def refuse(status: int, message: str) -> web.Response:
            if on_reject is not None:
                on_reject(request, status)
            return _json(status, message, error_body)

        value = request.headers.get("Expect", "")
        if value.strip().lower() != "100-continue":
            return refuse(417, f"unsupported Expect: {value[:40]!r}")
        try:
            length = _declared_length(request)
        except BadRequest as exc:
            return refuse(400, exc.message)
        if length is not None and length > max_body_bytes:
            return refuse(413, _too_large(max_body_bytes, length))
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    return expect


def _json(status: int, message: str, encode: Callable[[str], bytes]) -> web.Response:
    response = web.Response(
        status=status, body=encode(message), headers={"Content-Type": "application/json"}
    )
    response.force_close()
    return response


def make_limits_middleware(
    limits: ServerLimits, max_body_bytes: int, on_reject: OnReject | None = None
) -> Any:
    """Body limits before any handler: declared length, coding, read deadline.
    ``on_reject(request, status)`` is told of every refusal (the proxy counts refused
    infer requests as live traffic answered on the champion's path)."""

    @web.middleware
    async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        try:
            await _check_body(request)
        except (MirrorgateError, web.HTTPException) as exc:
            if on_reject is not None:
                on_reject(request, exc.status)
            if isinstance(exc, LimitError) and exc.status == 408:
                from proxy.protocol.codec import error_body

                # The rest of the body is not wanted: answer, then close.
                return _json(408, exc.message, error_body)
            raise
        return await handler(request)

    async def _check_body(request: web.Request) -> None:
        length = _declared_length(request)
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(_too_large(max_body_bytes, length))
        coding = content_coding(request.headers.get("Content-Encoding"))
        raw = request.app.get(RAW_BODY_LIMIT) is not None
        if coding and coding not in ENCODINGS and not raw:
            # aiohttp would pass such a body on undecoded; bodies read raw are judged by
            # whoever reads them (request_body, or the remote champion).
            raise _unsupported(coding)
        try:
            # Read (and cache) the whole body under a deadline; the handler's own
            # read() returns the cached bytes.
            if request.content.is_eof():
                # Already all in memory (the usual small request, which arrives with
                # its head): the read cannot wait, so no timer is armed for it.
                await request.read()
            else:
                # asyncio.timeout, not wait_for: no extra task per request on 3.11.
                async with asyncio.timeout(limits.body_timeout_s):
                    await request.read()
        except TimeoutError:
            raise LimitError(
                f"request body not received within {limits.body_timeout_s:g} s "
                "(server.limits.body_timeout_s)",
                status=408,
            ) from None
        except (HttpProcessingError, web.RequestPayloadError) as exc:
            # A body that does not decode as its declared coding (not really gzip).
            raise BadRequest(
                f"request body does not decode as Content-Encoding {coding or 'identity'!r}"
            ) from exc

    return limits_middleware


_SHED_BODY = b'{"error": "server overloaded: too many open connections"}'
_SHED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: "
    + str(len(_SHED_BODY)).encode()
    + b"\r\n\r\n"
    + _SHED_BODY
)


class _Shed(asyncio.Protocol):
    """The protocol of a connection over the cap: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_SHED)
        transport.close()


class GuardedServer(web.Server):
    """``web.Server`` that sheds connections past ``max_connections``."""

    max_connections: int
    shed: Counter
    # Handlers made but not yet connected: asyncio calls the protocol factory for a
    # burst of accepted sockets before any of their connection_made runs.
    opening: int

    def __call__(self) -> Any:
        if len(self._connections) + self.opening >= self.max_connections:
            self.shed.inc()
            return _Shed()
        self.opening += 1
        return super().__call__()

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        self.opening = max(0, self.opening - 1)
        super().connection_made(handler, transport)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server sheds connections over the cap."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        registry: CollectorRegistry,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._shed = Counter(
            "mirrorgate_server_connections_shed_total",
            "Connections refused at accept with a 503: the open-connection cap was reached",
            registry=registry,
        )

    @property
    def shed(self) -> Counter:
        """The shed counter (the byte-level front counts its own sheds in it too)."""
        return self._shed

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same object, one overridden method: aiohttp builds the Server itself.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.max_connections = self._max_connections
        server.shed = self._shed
        server.opening = 0
        return server


class RateLimitFilter(logging.Filter):
    """At most ``per_minute`` lines per (logger, message template) per minute; the first
    line after a quiet spell says how many were suppressed."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}
        self._lock = threading.Lock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = self.clock()
        with self._lock:
            start, count, dropped = self._windows.get(key, (now, 0, 0))
            if now - start >= 60.0:
                start, count = now, 0
            if count >= self.per_minute:
                self._windows[key] = (start, count, dropped + 1)
                self.suppressed += 1
                return False
            self._windows[key] = (start, count + 1, 0)
            if len(self._windows) > 10_000:  # messages are templates: few keys in practice
                self._windows.clear()
        if dropped:
            record.msg = f"{record.msg} [{dropped} similar line(s) suppressed]"
        return True


def install_log_limits(per_minute: int) -> RateLimitFilter:
    """Attach one rate-limit filter to every logger a client can make write."""
    limiter = RateLimitFilter(per_minute)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(limiter)
    return limiter


def remove_log_limits(limiter: RateLimitFilter) -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).removeFilter(limiter)
