"""A raw HTTP/1.1 client pool for one upstream: the one used by both raw callers.

``aiohttp``'s client costs about as much CPU per request as its server (request and
response objects, multidicts, URL objects, the trace signal that detects reused
connections, stream readers). Two callers skip it:

* the byte-level front (proxy/dataplane/front.py), whose champion call already has the
  client's request as bytes: it builds a head with :func:`request_head`;
* the shadow worker's mirrored candidate calls (proxy/shadow/candidate_client.py), which
  build the head from :meth:`proxy.backends.http.HttpBackend.infer_request`'s headers
  with :func:`header_lines`.

This pool sends the head plus the body bytes on a pooled keep-alive connection
(``asyncio.Protocol``, no stream objects) and reads the response with ``httptools``
(llhttp, the parser uvicorn uses): framing by ``Content-Length``, chunked, or the end
of the connection.

The rules are :class:`proxy.backends.http.HttpBackend`'s, so the two live paths fail
alike:

* one deadline (the backend's ``timeout_ms``) covers connect, send and the whole
  response read; a miss is :class:`BackendTimeout` (504);
* TLS with the backend's context (:func:`proxy.backends.http.ssl_context`: configured
  CA, optional client certificate);
* a request that fails on a *reused* pooled connection before any response byte
  arrived (the upstream closed the idle connection) is retried once on a fresh
  connection: nothing reached the upstream's application, so the retry cannot run a
  model twice. Any other failure is not retried;
* an interim (1xx) answer means the upstream has the request: from then on nothing is
  retried, and the final answer that follows is the reply;
* any other failure is a :class:`BackendError` (502) naming the upstream, worded as
  :meth:`HttpBackend._send <proxy.backends.http.HttpBackend>` words aiohttp's
  (``upstream <url> connection failed: ...``);
* a header value or name that would split the request (CR, LF) is refused before
  anything is sent: a :class:`BackendError` with status 400 (:func:`header_lines`).

Latency (:attr:`RawReply.latency_s`) is the upstream's, not the caller's: on a plain-TCP
connection the socket asks the kernel for receive timestamps (Linux ``SO_TIMESTAMPNS``:
each ``recvmsg`` returns the ``CLOCK_REALTIME`` arrival time of the last segment it
read), and the latency is the arrival time of the segment that completed the answer
minus the wall-clock time taken right before the request bytes were handed to
``send()``. A process that is descheduled (a loaded host, ``shadow.worker_nice``) reads
the answer late, but the stamp says when it came. asyncio's socket transport reads with
``recv()`` (no ancillary data), so plain-TCP connections run on :class:`_StampedTransport`,
a small transport over the non-blocking socket (``loop.add_reader``/``add_writer``, public
loop API, works on uvloop too) that feeds the same protocol. TLS connections keep
asyncio's transport (the record layer hides segments) and the ``perf_counter`` timing, as
does any connection where the kernel gives no stamp (``RawReply.stamped`` says which).
A fresh connection's connect time is not in the latency (nor a stale attempt's): the
clock starts at the send that got the answer. docs/benchmarks.md, "Upstream latency from
kernel timestamps (session 13)".

Concurrency is bounded by the callers (the front: one request in flight per client
connection, and client connections are capped; the worker: its mirror's concurrency),
so the pool itself only caps its idle connections (``max_idle``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httptools

from proxy.core.errors import BackendError, BackendTimeout, MirrorgateError

MAX_IDLE = 256
# Bodies up to this size are joined to the head (one send); larger ones go separately.
JOIN_BELOW = 1 << 18


# What RawPool.begin calls with the outcome: (reply, None) or (None, error).
Done = Callable[["RawReply | None", "MirrorgateError | None"], None]

# Linux's values (asm-generic and x86; the stdlib's socket module does not name them).
# Elsewhere no stamps are asked for and every reply is timed with perf_counter.
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
STAMPS = sys.platform == "linux"
# One ``struct timespec`` (two C longs on the 64-bit Linux this targets).
_TIMESPEC = struct.Struct("@ll")
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if STAMPS else 0
# asyncio's selector transports read up to this much per call.
READ_SIZE = 1 << 18


class _Stale(Exception):
    """The connection ended before any response byte (a reused one: retried once)."""


@dataclass(slots=True)
class RawReply:
    """An upstream's answer as it came: status, reason, header lines, body (de-chunked),
    and how long the upstream took (``latency_s``: from the kernel's receive timestamp
    when ``stamped``, else ``perf_counter`` from the send to the parsed answer)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    latency_s: float = 0.0
    stamped: bool = False


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, pool: RawPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[RawReply] | None = None
        self.got_bytes = False
        self.headers_done = False
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.done = False
        # When the request was handed to send() (both clocks), and the kernel's arrival
        # time of the last segment read so far (_StampedTransport sets it per read).
        self.sent_perf = 0.0
        self.sent_wall = 0.0
        self.arrived: float | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes while idle: the upstream broke the protocol (or sent a late 408);
            # this connection cannot be trusted for the next request.
            self._abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(
                BackendError(
                    f"upstream {self.pool.base_url} connection failed: malformed answer: {exc}"
                )
            )
            self._abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._forget(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if not self.got_bytes:
            waiter.set_exception(_Stale(repr(exc) if exc else "connection closed"))
        elif self.headers_done and self._eof_framed():
            # A body delimited by the end of the connection (no length, not chunked).
            self._finish(keep_alive=False)
        else:
            waiter.set_exception(
                BackendError(
                    # aiohttp's words for it ("payload"): both live paths say the same
                    f"upstream {self.pool.base_url} connection failed: response payload "
                    f"is not completed, connection lost mid-response{f' ({exc!r})' if exc else ''}"
                )
            )

    # ------------------------------------------------------------ httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Only a complete head can frame a body by the end of the connection: a loss
        # inside the head is a failure, not a reply.
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (e.g. an unsolicited 100 Continue): the real one follows.
            # ``got_bytes`` stays set: the upstream has the request, so a loss from here
            # on is never retried (it could run the model twice).
            self.reason, self.headers, self.chunks = b"", [], []
            self.headers_done = False
            return
        self._finish(keep_alive=self.parser.should_keep_alive())

    # ------------------------------------------------------------ internals

    def _eof_framed(self) -> bool:
        names = {n.lower() for n, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _finish(self, keep_alive: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done() or self.done:
            return
        self.done = True
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        latency, stamped = self._latency()
        waiter.set_result(
            RawReply(
                self.parser.get_status_code(),
                self.reason,
                self.headers,
                body,
                keep_alive,
                latency,
                stamped,
            )
        )

    def _latency(self) -> tuple[float, bool]:
        """The exchange's latency, and whether the kernel's stamp gave it."""
        elapsed = time.perf_counter() - self.sent_perf
        if self.arrived is not None:
            stamped = self.arrived - self.sent_wall
            # The segment arrived before it was read, so a stamp can only be earlier
            # than now: one that is not (the wall clock was stepped between the send
            # and the answer) is not trusted.
            if 0.0 <= stamped <= elapsed:
                return stamped, True
        return elapsed, False

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def send(self, head: bytes, body: bytes) -> asyncio.Future[RawReply]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.got_bytes = self.done = self.headers_done = False
        self.reason, self.headers, self.chunks = b"", [], []
        self.arrived = None
        # perf first: the fallback interval can only be the longer one (see _latency).
        self.sent_perf = time.perf_counter()
        self.sent_wall = time.time()
        if len(body) < JOIN_BELOW:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return self.waiter


class RawPool:
    """Keep-alive connections to one upstream (``http(s)://host[:port]``)."""

    def __init__(
        self, url: str, *, ssl_context: ssl.SSLContext | None = None, max_idle: int = MAX_IDLE
    ) -> None:
        parts = urlsplit(url)
        self.base_url = url.rstrip("/")
        self.secure = parts.scheme.lower() == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.secure else 80)
        # The Host header aiohttp's client sends: the port only when not the default.
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        self.host_header = (host if self.port == default else f"{host}:{self.port}").encode()
        # A base path (``http://h/prefix``) prefixes every request path.
        self.base_path = parts.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        if self.secure:
            self.ssl = ssl_context or ssl.create_default_context()
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._tasks: set[asyncio.Task[RawReply]] = set()
        self._closed = False

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self.ssl is None and STAMPS:
            sock = await _open_socket(loop, self.host, self.port)
            conn = _Conn(self)
            _StampedTransport(loop, sock, conn)
            self._all.add(conn)
            return conn
        _, conn = await loop.create_connection(
            lambda: _Conn(self),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.host if self.ssl is not None else None,
        )
        self._all.add(conn)
        return conn

    async def _wait(
        self, conn: _Conn, waiter: asyncio.Future[RawReply], deadline: float
    ) -> RawReply:
        # The deadline as one timer on the waiter (no asyncio.timeout: no task lookup
        # and no cancellation machinery per request on the live path).
        timer = asyncio.get_running_loop().call_at(deadline, _expire, waiter)
        try:
            reply = await waiter
        except BaseException:
            conn._abort()  # mid-exchange (deadline, cancel, failure): never reused
            raise
        finally:
            timer.cancel()
        self._release(conn, reply)
        return reply

    def _release(self, conn: _Conn, reply: RawReply) -> None:
        """After a complete reply: the connection back to the idle list, or closed."""
        conn.waiter = None
        if reply.keep_alive and not self._closed and len(self._idle) < self.max_idle:
            if conn.transport is not None and not conn.transport.is_closing():
                self._idle.append(conn)
                return
        self._close_conn(conn)

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    @staticmethod
    def _close_conn(conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.close()

    async def request(self, head: bytes, body: bytes, timeout_s: float) -> RawReply:
        """Send ``head`` (request line and headers, ending in a blank line) and ``body``;
        the reply, or :class:`BackendTimeout` / :class:`BackendError`."""
        return await self.start(head, body, timeout_s)

    def start(self, head: bytes, body: bytes, timeout_s: float) -> Coroutine[Any, Any, RawReply]:
        """:meth:`request`, the bytes already sent when a kept connection is idle (the
        usual case): the caller works while the upstream answers, then awaits the reply.
        The returned coroutine must be awaited (it owns the connection)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        conn = self._take_idle()
        waiter = conn.send(head, body) if conn is not None else None
        return self._reply(conn, waiter, head, body, deadline, timeout_s)

    def begin(self, head: bytes, body: bytes, timeout_s: float, done: Done) -> None:
        """:meth:`request` without a task: ``done(reply, None)`` or ``done(None, error)``
        (:class:`BackendTimeout` / :class:`BackendError`) is called once, from the event
        loop, never from inside this call. On a kept idle connection (the usual case)
        the bytes are sent now and the reply costs one callback; otherwise (connecting,
        the stale-connection retry) a task of this pool runs :meth:`request`'s path."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = self._take_idle()
        if conn is None:
            self._spawn(self._reply(None, None, head, body, deadline, timeout_s), done)
            return
        waiter = conn.send(head, body)
        timer = loop.call_at(deadline, _expire, waiter)
        waiter.add_done_callback(
            partial(self._settle, conn, timer, head, body, deadline, timeout_s, done)
        )

    def _settle(
        self,
        conn: _Conn,
        timer: asyncio.TimerHandle,
        head: bytes,
        body: bytes,
        deadline: float,
        timeout_s: float,
        done: Done,
        waiter: asyncio.Future[RawReply],
    ) -> None:
        timer.cancel()
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None and not waiter.cancelled():
            reply = waiter.result()
            self._release(conn, reply)
            done(reply, None)
            return
        conn._abort()  # mid-exchange: never reused
        if isinstance(exc, _Stale):
            # closed while idle: once more, on a fresh connection
            self._spawn(self._reply(None, None, head, body, deadline, timeout_s), done)
            return
        done(None, self._error(exc or asyncio.CancelledError(), timeout_s))

    def _spawn(self, coro: Coroutine[Any, Any, RawReply], done: Done) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a strong reference until it ends (asyncio keeps weak ones)
        task.add_done_callback(partial(self._spawned, done))

    def _spawned(self, done: Done, task: asyncio.Task[RawReply]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            done(None, BackendError(f"upstream {self.base_url} call cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            done(None, self._error(exc, 0.0))  # _reply's own errors pass as they are
            return
        done(task.result(), None)

    def _error(self, exc: BaseException, timeout_s: float) -> MirrorgateError:
        """What :meth:`request` and :meth:`begin` give for ``exc`` (one wording)."""
        if isinstance(exc, MirrorgateError):
            return exc
        error: MirrorgateError
        if isinstance(exc, TimeoutError):
            error = BackendTimeout(
                f"upstream {self.base_url} timed out after {timeout_s * 1000:g} ms"
            )
        elif isinstance(exc, (OSError, ssl.SSLError)):
            error = BackendError(f"upstream {self.base_url} connection failed: {exc!r}")
        else:
            error = BackendError(f"upstream {self.base_url} call failed: {exc!r}")
        error.__cause__ = exc
        return error

    async def _reply(
        self,
        conn: _Conn | None,
        waiter: asyncio.Future[RawReply] | None,
        head: bytes,
        body: bytes,
        deadline: float,
        timeout_s: float,
    ) -> RawReply:
        try:
            if conn is not None and waiter is not None:
                try:
                    return await self._wait(conn, waiter, deadline)
                except _Stale:
                    pass  # closed while idle: once more, on a fresh connection
            async with asyncio.timeout_at(deadline):  # connecting (rare: the pool keeps them)
                conn = await self._connect()
            try:
                return await self._wait(conn, conn.send(head, body), deadline)
            except _Stale as exc:
                raise BackendError(
                    f"upstream {self.base_url} connection failed: closed the connection "
                    f"without answering ({exc})"
                ) from exc
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise self._error(exc, timeout_s) from exc

    def close(self) -> None:
        """Close the idle connections now; one in the middle of an exchange finishes it
        and is closed then (``_wait``), so a pool replaced while requests are in flight
        (the front's, when the champion changes) fails none of them."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close_conn(conn)


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket, as ``loop.create_connection`` would make one
    (each resolved address in turn; a numeric host resolves without a thread)."""
    try:
        infos = socket.getaddrinfo(
            host,
            port,
            type=socket.SOCK_STREAM,
            proto=socket.IPPROTO_TCP,
            flags=socket.AI_NUMERICHOST,
        )
    except socket.gaierror:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    # create_connection's wording for several failed addresses
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


class _StampedTransport(asyncio.Transport):
    """A plain-TCP transport that reads with ``recvmsg`` and hands the protocol the
    kernel's receive timestamp of each read (``_Conn.arrived``) before its bytes.

    What it does is what asyncio's selector socket transport does for this protocol:
    writes go straight to ``send`` and the rest waits for the socket to be writable; a
    read of nothing is the end of the connection (``eof_received``, then closed, since
    the protocol does not keep half-open connections); a read or write error, ``abort``
    and ``close`` end in one ``connection_lost`` (scheduled, as asyncio does, never
    from inside the protocol's own call) and the socket closed after it. No flow
    control: one request at a time goes out, and the reader is never paused."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: _Conn) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._conn = conn
        self._buffer = bytearray()
        self._closing = False
        self._lost = False
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass  # no stamps: every reply falls back to perf_counter
        conn.connection_made(self)
        loop.add_reader(self._fd, self._read_ready)

    # ------------------------------------------------------------ asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name in ("peername", "sockname"):
            try:
                return self._sock.getpeername() if name == "peername" else self._sock.getsockname()
            except OSError:
                return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if self._buffer:
            self._buffer += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._force_close(exc)
            return
        if sent < len(data):
            self._buffer += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._write_ready)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._buffer:  # else the writer finishes sending, then ends it
            self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self._force_close(None)

    # ------------------------------------------------------------ internals

    def _read_ready(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(READ_SIZE, _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if not data:
            self._conn.eof_received()
            self.close()
            return
        arrived = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                arrived = seconds + nanoseconds * 1e-9
        self._conn.arrived = arrived
        self._conn.data_received(data)

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:sent]
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._loop.call_soon(self._connection_lost, None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._loop.remove_writer(self._fd)
        if not self._closing:
            self._closing = True
            self._loop.remove_reader(self._fd)
        self._lost = True
        self._loop.call_soon(self._connection_lost_now, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._connection_lost_now(exc)

    def _connection_lost_now(self, exc: Exception | None) -> None:
        try:
            self._conn.connection_lost(exc)
        finally:
            self._sock.close()


def _expire(waiter: asyncio.Future[RawReply]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def request_head(
    method: bytes, target: bytes, host: bytes, headers: Sequence[bytes], length: int
) -> bytes:
    """An HTTP/1.1 request head: ``headers`` are complete ``Name: value`` lines."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, *headers]
    lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def header_lines(headers: Iterable[tuple[str, str]]) -> list[bytes]:
    """``Name: value`` lines for :func:`request_head` from decoded header pairs.

    A CR or LF (or a colon in a name) would let a value end its line and start another
    header, or the body, of the caller's choosing: refused (400) before anything is
    sent (aiohttp's writer refuses them too)."""
    lines = []
    for name, value in headers:
        if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
            raise BackendError(f"a header the upstream cannot be sent: {name!r}", status=400)
        lines.append(
            name.encode("utf-8", "surrogateescape")
            + b": "
            + value.encode("utf-8", "surrogateescape")
        )
    return lines
