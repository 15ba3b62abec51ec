"""The byte-level live path: the data port in front of a remote champion (``server.live_path``).

In front of a V2 server the live path only forwards bytes (docs/proxy.md), and what
``aiohttp``'s server and client cost per request is then most of what mirrorgate adds
(docs/benchmarks.md, "cheapest Python mirror"). This listener answers the one plain,
hot request itself, at the ``asyncio.Protocol`` level, and hands everything else to the
aiohttp data app unchanged:

* **Fast path**: ``POST /v2/models/{served}[/versions/{v}]/infer``, HTTP/1.1 or 1.0,
  a ``Content-Length`` body within ``server.max_body_bytes`` (no chunked body, no
  ``Expect``, no ``Upgrade``), a head of plain ASCII ``Name: value`` lines, the models
  loaded and the request answered by the champion (no canary weight in force). It
  forwards to the champion exactly what :func:`proxy.dataplane.passthrough.infer`
  forwards (the same end-to-end headers, path, body bytes and ``Content-Encoding``)
  over a raw keep-alive pool (proxy/backends/rawhttp.py), answers the champion's
  status, headers and body as the aiohttp path does (same hop-by-hop filtering, same
  ``X-Request-Id``/``X-Mirrorgate-Served-By``, ``Date``/``Server`` when the champion
  sent none), observes the same metrics and hands the exchange to the mirror with the
  same decoder: the shadow worker cannot tell the two paths apart.
* **Everything else** (any other path or method, chunked or ``Expect``, over the
  limit, an unusual head, canary traffic, models not loaded) is answered by the aiohttp
  data app, which listens on a Unix socket in a private (0700) directory, with all its
  behaviour (errors, limits, auth, 413/417, metadata, health, /v1 and /metrics on the
  data port), over a connection the client's connection keeps to it. A keep-alive
  HTTP/1.1 request framed by ``Content-Length`` (or bodiless) is *relayed*: its answer
  is passed back as it comes and read only to see where it ends, and the connection
  is the front's again after it (a readiness or metadata request must not cost a
  client the fast path for the rest of its connection). What cannot be framed or
  delimited that way is *spliced*: the connection is the app's from that request's
  first byte on.

The slow-client bounds of proxy/dataplane/limits.py hold here too: an idle connection,
or one whose request head is incomplete, is closed after ``keepalive_timeout_s``; a
body not complete within ``body_timeout_s`` gets the same 408 and the connection
closes; connections past ``max_connections`` (counted here, spliced ones included) are
shed at accept time with the same 503 and counter. Deadlines are re-armed lazily (one
timer per connection, moved only when it fires early), so a request costs no timer
churn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import httptools
from multidict import CIMultiDict
from prometheus_client import Counter

from proxy.backends.http import HttpBackend, ssl_context
from proxy.backends.rawhttp import RawPool, RawReply, request_head
from proxy.core import context
from proxy.core.errors import MirrorgateError
from proxy.core.runtime_settings import ServerLimits
from proxy.dataplane.http11 import (
    NAME,
    Head,
    Request,
    as_reply,
    client_headers,
    json_error,
    parse_head,
    read_head,
    relay_length,
    response,
)
from proxy.dataplane.limits import _Shed, content_coding
from proxy.dataplane.passthrough import (
    _peek_id,
    _peek_id_coded,
    _usable_id,
    exchange_decoder,
    failures,
)
from proxy.dataplane.state import ProxyState

log = logging.getLogger(__name__)

# Longest request head the fast path reads (aiohttp's line limit); longer goes to aiohttp.
MAX_HEAD = 8190
# Bytes buffered past the request being answered before the client is paused.
PAUSE_AT = 1 << 20

# RELAY: a request the aiohttp app answers is on its way there and back; the connection
# returns to IDLE after its answer (or becomes SPLICE when it cannot).
IDLE, BODY, BUSY, SPLICE, CLOSED, RELAY = range(6)


class _Delegate(asyncio.Protocol):
    """A client's connection to the aiohttp app: its bytes go to the client as they
    come. While a relayed request is answered, they are also read (httptools) to see
    where the answer ends, and the client's connection is taken back there."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.complete = False
        self.keep_alive = False
        # When it last went idle (aiohttp closes it keepalive_timeout_s later).
        self.since = client.loop.time()

    def expect_answer(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.complete = False

    def on_message_complete(self) -> None:  # httptools
        self.complete = True
        # Read here: httptools forgets it once the message is over.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client.transport is not None:
            client.transport.write(data)
        parser = self.parser
        if parser is None:
            if client.phase != SPLICE:
                client._close()  # an answer nobody asked for: the connection is not sound
            return
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Not an answer the front can delimit: the rest of the connection is aiohttp's.
            self.parser = None
            client._splice_rest()
            return
        if self.complete:
            self.parser = None
            self.since = client.loop.time()
            client._relayed(self.keep_alive)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        client = self.client
        if client.delegate is not self:
            return  # a stale one the client already replaced
        client.delegate = None
        if client.phase in (SPLICE, RELAY):
            client._close()  # aiohttp closed its side mid-answer or for good: so does the client
        # Otherwise it was idle between relays (aiohttp's keep-alive timeout): the next
        # relayed request opens another.

    def pause_writing(self) -> None:
        self.client._hold_reading(True)

    def resume_writing(self) -> None:
        self.client._hold_reading(False)


class _Client(asyncio.Protocol):
    """One client connection on the data port."""

    def __init__(self, front: FrontServer) -> None:
        self.front = front
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.phase = IDLE
        self.request: Request | None = None
        self.need = 0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # reading paused: too much buffered past the request in hand
        self.held = False  # reading paused: the aiohttp side cannot take more
        self.delegate: _Delegate | None = None
        self.connecting = False
        self.pending: list[bytes] = []
        self.relay_left = 0  # body bytes of the relayed request still to send on
        self.delivered = False  # the fast-path request in hand has had its answer
        self.half_closed = False

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        front = self.front
        front.opening = max(0, front.opening - 1)
        front.clients.add(self)
        self._until(front.limits.keepalive_timeout_s)
        if front.closing:
            self._close()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == SPLICE:
            self._to_delegate(data)
            return
        if phase == RELAY and self.relay_left > 0:
            if len(data) <= self.relay_left:
                self.relay_left -= len(data)
                self._to_delegate(data)
                return
            self._to_delegate(data[: self.relay_left])
            data = data[self.relay_left :]
            self.relay_left = 0
        self.buf += data
        if phase == BUSY or phase == RELAY:
            if len(self.buf) > PAUSE_AT and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            return
        self._advance()

    def eof_received(self) -> bool | None:
        self.half_closed = True
        if self.phase == RELAY and self.relay_left > 0:
            self._splice_rest()  # a cut body: aiohttp judges it, the connection is its
        if self.phase == SPLICE:
            delegate = self.delegate
            if delegate is not None and delegate.transport is not None:
                if delegate.transport.can_write_eof():
                    delegate.transport.write_eof()
                    return True
                return None
            return True  # sent on once the delegate connection is up
        if self.phase == BUSY or self.phase == RELAY:
            return True  # answer the request in hand, then close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.phase = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.front.clients.discard(self)
        self.front._settled()
        delegate = self.delegate
        if delegate is not None and delegate.transport is not None:
            delegate.transport.close()

    def pause_writing(self) -> None:
        delegate = self.delegate
        if delegate is not None and delegate.transport is not None:
            delegate.transport.pause_reading()

    def resume_writing(self) -> None:
        delegate = self.delegate
        if delegate is not None and delegate.transport is not None:
            delegate.transport.resume_reading()

    def _hold_reading(self, hold: bool) -> None:
        """The aiohttp side's flow control, without undoing a pause of our own."""
        self.held = hold
        if self.transport is None:
            return
        if hold:
            self.transport.pause_reading()
        elif not self.paused:
            self.transport.resume_reading()

    def _unpause(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.held:
                self.transport.resume_reading()

    # ------------------------------------------------------------ deadlines

    def _until(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.phase not in (IDLE, BODY):
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._expired)
            return
        if self.phase == BODY and self.transport is not None:
            # limits.py's 408: counted as a refused infer request, answered, closed.
            seconds = self.front.limits.body_timeout_s
            message = (
                f"request body not received within {seconds:g} s (server.limits.body_timeout_s)"
            )
            self.front.state.metrics.observe_call("champion", 408, None)
            request = self.request
            self.transport.write(
                json_error(request.version10 if request else False, 408, message, False)
            )
        self._close()

    # ------------------------------------------------------------ requests

    def _advance(self) -> None:
        """Read the next request from the buffer: answer it here, or splice."""
        front = self.front
        if self.phase == IDLE:
            end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._splice()
                return
            head = read_head(bytes(self.buf[:end]))
            request = None if head is None else front.eligible(head)
            if request is None:
                length = None if head is None else relay_length(head)
                if length is None:
                    self._splice()
                else:
                    self._relay(end + 4 + length)
                return
            self.request = request
            self.need = end + 4 + request.length
            self.phase = BODY
            self.deadline = self.loop.time() + front.limits.body_timeout_s
            if self.timer is not None and self.timer.when() > self.deadline:
                self.timer.cancel()
                self.timer = None
            if self.timer is None:
                self.timer = self.loop.call_at(self.deadline, self._expired)
        if self.phase == BODY and len(self.buf) >= self.need:
            request = self.request
            assert request is not None
            if not front.serving():
                self._splice()  # the weight or the models changed meanwhile
                return
            body = bytes(self.buf[self.need - request.length : self.need])
            del self.buf[: self.need]
            self.phase = BUSY
            front.busy += 1
            front.answered += 1
            if request.coding is None:
                self._begin(request, body)  # the usual case: no task per request
            else:
                self.loop.create_task(self._answer(request, body))

    def _begin(self, request: Request, body: bytes) -> None:
        self.delivered = False
        try:
            self.front.begin(self, request, body)
        except Exception as exc:
            self._internal_error(request, exc)
            self.front._request_done()

    async def _answer(self, request: Request, body: bytes) -> None:
        front = self.front
        self.delivered = False
        try:
            await front.answer(self, request, body)
        except Exception as exc:
            self._internal_error(request, exc)
        finally:
            front._request_done()

    def _internal_error(self, request: Request, exc: Exception) -> None:
        if self.delivered:
            # The client has its answer: what failed is the work after it.
            log.error("error after answering POST %r", request.path, exc_info=exc)
            return
        log.error("unhandled error on POST %r", request.path, exc_info=exc)
        self.deliver(
            request,
            json_error(
                request.version10,
                500,
                f"internal error: {type(exc).__name__}",
                request.keep_alive and not self.front.closing,
                request.request_id,
            ),
            request.keep_alive,
        )

    def deliver(self, request: Request, answer: bytes, keep_alive: bool) -> None:
        """Write the answer to a fast-path request; the connection is ready for the next
        one (or closed). Called once per request, before the work that follows the
        answer (metrics, the mirror hand-off), which the client need not wait for."""
        self.delivered = True
        transport = self.transport
        if transport is None:
            return
        front = self.front
        if not keep_alive or front.closing or self.half_closed:
            transport.write(answer)
            self._close()
            return
        transport.write(answer)
        self.phase = IDLE
        self.request = None
        self._until(front.limits.keepalive_timeout_s)
        self._unpause()
        if self.buf:
            self._advance()  # a pipelined request

    def _relay(self, size: int) -> None:
        """This request (``size`` bytes with its head) is the aiohttp app's to answer;
        the connection comes back after the answer (:meth:`_relayed`)."""
        front = self.front
        front.relayed += 1
        self.phase = RELAY
        take = min(size, len(self.buf))
        data = bytes(self.buf[:take])
        del self.buf[:take]
        self.relay_left = size - take
        delegate = self._drop_stale_delegate()
        if delegate is not None:
            delegate.expect_answer()
        self._to_delegate(data)

    def _drop_stale_delegate(self) -> _Delegate | None:
        """The delegate connection, unless it has been idle long enough that aiohttp
        may be closing it as a request arrives: then a fresh one, not a request lost in
        that race."""
        delegate = self.delegate
        if delegate is not None and (
            delegate.transport is None
            or self.loop.time() - delegate.since > self.front.limits.keepalive_timeout_s / 2
        ):
            self.delegate = None
            if delegate.transport is not None:
                delegate.transport.close()
            return None
        return delegate

    def _relayed(self, keep_alive: bool) -> None:
        """The aiohttp app's answer to the relayed request has been passed on."""
        if self.phase != RELAY:
            return
        if not keep_alive or self.relay_left > 0:
            # aiohttp will close it, or answered before the body was all sent (an
            # early 413/401): what follows is between the client and aiohttp.
            self._splice_rest()
            return
        front = self.front
        self.phase = IDLE
        front._settled()
        if front.closing or self.half_closed:
            self._close()
            return
        self._until(front.limits.keepalive_timeout_s)
        self._unpause()
        if self.buf:
            self._advance()  # a pipelined request

    def _splice(self) -> None:
        """From this request's first byte on, the connection is the aiohttp app's."""
        self.front.spliced += 1
        self.phase = SPLICE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        data = bytes(self.buf)
        self.buf = bytearray()
        self._drop_stale_delegate()
        self._to_delegate(data)

    def _splice_rest(self) -> None:
        """From the end of a relayed request on, the connection is the aiohttp app's."""
        if self.phase == SPLICE:
            return
        self.front.spliced += 1
        self.phase = SPLICE
        self.front._settled()
        data = bytes(self.buf)
        self.buf = bytearray()
        self._unpause()
        if data:
            self._to_delegate(data)

    def _to_delegate(self, data: bytes) -> None:
        delegate = self.delegate
        if delegate is not None and delegate.transport is not None:
            delegate.transport.write(data)
            return
        self.pending.append(data)
        if not self.connecting:
            self.connecting = True
            self.loop.create_task(self._connect_delegate())

    async def _connect_delegate(self) -> None:
        try:
            transport, delegate = await self.loop.create_unix_connection(
                lambda: _Delegate(self), self.front.delegate_path
            )
        except OSError as exc:
            log.error("the data app's socket refused a connection: %r", exc)
            self.connecting = False
            self._close()
            return
        self.connecting = False
        if self.transport is None:
            transport.close()
            return
        self.delegate = delegate
        if self.phase == RELAY:
            delegate.expect_answer()
        transport.write(b"".join(self.pending))
        self.pending.clear()
        if self.phase == SPLICE and self.half_closed and transport.can_write_eof():
            transport.write_eof()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FrontServer:
    """The byte-level listener of the data port, with the aiohttp data app behind it."""

    def __init__(
        self,
        state: ProxyState,
        delegate_path: str,
        *,
        limits: ServerLimits,
        max_connections: int,
        shed: Counter,
    ) -> None:
        self.state = state
        self.delegate_path = delegate_path
        self.limits = limits
        self.max_connections = max_connections
        self.shed = shed
        self.loop = asyncio.get_running_loop()
        self.clients: set[_Client] = set()
        self.opening = 0
        self.busy = 0
        self.closing = False
        # Requests answered here, connections handed to the aiohttp app (tests, docs).
        self.answered = 0
        self.relayed = 0  # requests relayed to the aiohttp app, the connection kept
        self.spliced = 0
        self._settled_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pool: RawPool | None = None
        self._pool_of: HttpBackend | None = None
        self._served = state.config.server.model_name.encode()
        self._usable = NAME.fullmatch(state.config.server.model_name) is not None
        self._max_body = state.config.server.max_body_bytes

    # ------------------------------------------------------------ listener

    def _accept(self) -> asyncio.Protocol:
        if len(self.clients) + self.opening >= self.max_connections:
            self.shed.inc()
            return _Shed()
        self.opening += 1
        return _Client(self)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            self._accept, host, port, reuse_port=reuse_port or None, backlog=1024
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def stop_accepting(self) -> None:
        """No new connections; idle ones close now, busy ones after their answer."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            if client.phase == IDLE and not client.buf:
                client._close()

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the requests in hand to be answered, then
        close what is not spliced (spliced connections end with the aiohttp app's)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._in_hand():
                    self._settled_event.clear()
                    await self._settled_event.wait()
        for client in list(self.clients):
            if client.phase != SPLICE:
                client._close()

    def _in_hand(self) -> bool:
        return self.busy > 0 or any(c.phase in (BODY, RELAY) for c in self.clients)

    def _settled(self) -> None:
        self._settled_event.set()

    def _request_done(self) -> None:
        """A fast-path request is over (answered, and the work after the answer done)."""
        self.busy -= 1
        self._settled()

    def close(self) -> None:
        """After the aiohttp app stopped: every connection and the pool."""
        for client in list(self.clients):
            client._close()
        if self._pool is not None:
            self._pool.close()

    # ------------------------------------------------------------ the fast path

    def _champion(self) -> HttpBackend | None:
        champion = self.state.champion
        return champion if isinstance(champion, HttpBackend) else None

    def serving(self) -> bool:
        """Whether the champion answers this request (else the aiohttp app judges)."""
        mirror = self.state.mirror
        if mirror is None or self._champion() is None:
            return False
        # Canary routing is the aiohttp path's (one draw per request, never two).
        return mirror.candidate is None or mirror.candidate_stopped or mirror.canary_weight <= 0

    def eligible(self, head: Head) -> Request | None:
        if not self._usable or not self.serving():
            return None
        champion = self._champion()
        assert champion is not None
        model = champion.model
        if NAME.fullmatch(model) is None:
            return None
        return parse_head(head, self._served, model.encode(), self._max_body)

    def _pool_for(self, backend: HttpBackend) -> RawPool:
        if self._pool_of is not backend or self._pool is None:
            if self._pool is not None:
                self._pool.close()
            self._pool = RawPool(backend.base_url, ssl_context=ssl_context(backend.settings))
            self._pool_of = backend
        return self._pool

    def _champion_head(self, request: Request, body: bytes) -> tuple[HttpBackend, RawPool, bytes]:
        """The champion, its pool and the request head it is sent (what
        passthrough.infer forwards)."""
        backend = self._champion()
        assert backend is not None
        lines = request.lines
        if request.coding is not None:
            lines = [*lines, b"Content-Encoding: " + request.coding.encode()]
        if not request.has_accept:
            lines = [*lines, b"Accept: */*"]  # what aiohttp's client adds
        pool = self._pool_for(backend)
        head = request_head(
            b"POST", pool.base_path.encode() + request.path, pool.host_header, lines, len(body)
        )
        return backend, pool, head

    def begin(self, client: _Client, request: Request, body: bytes) -> None:
        """A plain-body fast-path request, without a task: sent to the champion now (on
        a kept connection), answered from the pool's callback (:meth:`_finish`)."""
        backend, pool, head = self._champion_head(request, body)
        start = time.perf_counter()
        exchange = _Exchange(self, client, request, body, backend, start)
        pool.begin(head, body, backend.settings.timeout_ms / 1000.0, exchange.done)
        # DESIGN's order for the id: the body's, else the header, else generated
        # (passthrough.infer). The champion is not sent it: read while it works. Nothing
        # here may raise now that the exchange is under way (its callback answers).
        try:
            body_rid = _peek_id(body, request.header_length)
        except Exception:
            body_rid = None
        exchange.rid = _request_id(body_rid, request)

    async def answer(self, client: _Client, request: Request, body: bytes) -> None:
        """A fast-path request whose body has a Content-Encoding: the id is read from the
        decoded body first (decoding may await a thread), then as :meth:`begin`."""
        backend, pool, head = self._champion_head(request, body)
        coding = content_coding(request.coding)
        rid = _request_id(
            await _peek_id_coded(body, request.header_length, coding, self._max_body), request
        )
        context.client_headers.set(request.headers)
        context.request_id.set(rid)
        start = time.perf_counter()
        try:
            reply = await pool.request(head, body, backend.settings.timeout_ms / 1000.0)
        except MirrorgateError as exc:
            self._finish(client, request, body, backend, rid, start, None, exc)
            return
        self._finish(client, request, body, backend, rid, start, reply, None)

    def _finish(
        self,
        client: _Client,
        request: Request,
        body: bytes,
        backend: HttpBackend,
        rid: str,
        start: float,
        reply: RawReply | None,
        error: MirrorgateError | None,
    ) -> None:
        """Answer the client (``client.deliver``), then observe the exchange and hand it
        to the mirror: nothing after the answer is on the client's clock."""
        state = self.state
        # The champion's latency as the worker measures the candidate's (rawhttp: from
        # the kernel's receive timestamp where there is one), so the latency gates
        # compare like with like; a failed call has no answer to stamp.
        latency = time.perf_counter() - start if reply is None else reply.latency_s
        # Decided now: a stop that began while the champion worked ends this connection.
        keep_alive = request.keep_alive and not self.closing
        if reply is None:
            assert error is not None
            message = f"champion: {error.message}"
            answer = json_error(
                request.version10, error.status, message, keep_alive, request.request_id
            )
            client.deliver(request, answer, keep_alive)
            state.metrics.observe_champion(error.status, latency)
            failures.failure(backend.base_url, error.status, error.message)
            return
        status = reply.status
        out, kept = client_headers(reply)
        if b"x-request-id" not in kept:
            out.append(b"X-Request-Id: " + rid.encode())
        out.append(b"X-Mirrorgate-Served-By: champion")
        client.deliver(
            request,
            response(
                request.version10,
                status,
                reply.reason,
                out,
                reply.body,
                keep_alive,
                has_type=b"content-type" in kept,
                has_date=b"date" in kept,
                has_server=b"server" in kept,
            ),
            keep_alive,
        )
        state.metrics.observe_champion(status, latency)
        if status >= 500:
            failures.failure(backend.base_url, status, reply.body[:200].decode(errors="replace"))
        mirror = state.mirror
        if status == 200 and mirror is not None and mirror.candidate is not None:
            coding = content_coding(request.coding)
            mirror.mirror_exchange(
                rid,
                slices=self._slices(request),
                latency_s=latency,
                nbytes=len(body) + len(reply.body),
                decode=exchange_decoder(
                    body,
                    request.header_length,
                    as_reply(reply),
                    state.slicer.parameter_slices,
                    coding,
                    self._max_body,
                ),
                offload=bool(coding),
            )

    def _slices(self, request: Request) -> dict[str, str]:
        slicer = self.state.slicer
        if not slicer.header_keys:
            return {}
        return slicer.request_slices(CIMultiDict(request.headers), {})


def _request_id(body_rid: str | None, request: Request) -> str:
    client_rid = (request.request_id or "").strip() or None
    return _usable_id(body_rid) or _usable_id(client_rid) or uuid.uuid4().hex


class _Exchange:
    """One plain-body fast-path request between :meth:`FrontServer.begin` and the
    champion's reply (the pool's callback)."""

    __slots__ = ("backend", "body", "client", "front", "request", "rid", "start")

    def __init__(
        self,
        front: FrontServer,
        client: _Client,
        request: Request,
        body: bytes,
        backend: HttpBackend,
        start: float,
    ) -> None:
        self.front = front
        self.client = client
        self.request = request
        self.body = body
        self.backend = backend
        self.start = start
        self.rid = ""

    def done(self, reply: RawReply | None, error: MirrorgateError | None) -> None:
        # A context of its own: the pool calls back from the loop's context, which the
        # request's id and headers (read by the mirror and the logs) must not leak into.
        contextvars.Context().run(self._done, reply, error)

    def _done(self, reply: RawReply | None, error: MirrorgateError | None) -> None:
        front, client, request = self.front, self.client, self.request
        context.client_headers.set(request.headers)
        context.request_id.set(self.rid)
        try:
            front._finish(
                client, request, self.body, self.backend, self.rid, self.start, reply, error
            )
        except Exception as exc:
            client._internal_error(request, exc)
        finally:
            front._request_done()


# ---------------------------------------------------------------- which live path


def uses_bytes(live_path: str, champion_kind: str) -> bool:
    """``server.live_path``: ``auto`` is the byte-level path in front of a remote champion."""
    if live_path == "auto":
        return champion_kind == "http"
    return live_path == "bytes"


class DelegateDir:
    """A private (0700) directory holding the aiohttp app's Unix socket."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="mirrorgate-data-")
        os.chmod(self.path, 0o700)
        self.socket = os.path.join(self.path, "data.sock")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


async def start_front(
    runner: Any,
    state: ProxyState,
    host: str,
    port: int,
    *,
    limits: ServerLimits,
    max_connections: int,
    shed: Counter,
    reuse_port: bool = False,
) -> tuple[FrontServer, DelegateDir, tuple[str, int]]:
    """Serve ``runner``'s app on a private Unix socket and the front on ``host:port``."""
    from aiohttp import web

    where = DelegateDir()
    try:
        await web.UnixSite(runner, where.socket).start()
        front = FrontServer(
            state, where.socket, limits=limits, max_connections=max_connections, shed=shed
        )
        address = await front.start(host, port, reuse_port=reuse_port)
    except BaseException:
        where.remove()
        raise
    return front, where, address
