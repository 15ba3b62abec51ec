"""The shadow worker's candidate calls on a raw HTTP/1.1 keep-alive pool.

The worker spends most of a mirrored pair's CPU in the candidate call; through
``aiohttp``'s client (request and response objects, multidicts, URL objects, the trace
signal that detects reused connections, stream readers) that was ~35% of the worker's
CPU per pair (docs/shadow-worker.md, "Cost"). Here a request is one ``bytes`` head plus
the body written on a pooled ``asyncio.Protocol`` connection, and the answer is parsed by
``httptools`` (llhttp, the parser uvicorn uses) into a :class:`~proxy.backends.http.Reply`.

What is sent and how the answer is read are :class:`~proxy.backends.http.HttpBackend`'s
(:meth:`~proxy.backends.http.HttpBackend.infer_request` /
:meth:`~proxy.backends.http.HttpBackend.infer_result`: the encoding negotiated with the
upstream, the forwarded headers, the request id, the upstream's errors), and so are the
transport's rules:

* one deadline (the backend's ``timeout_ms``) covers connect, send and the whole
  response read; a miss is :class:`BackendTimeout` (504) and the connection is closed,
  never reused mid-response;
* TLS with the backend's context (configured CA, optional client certificate);
* a request that fails on a *reused* pooled connection before any response byte
  arrived (the upstream closed the idle connection) is retried once on a fresh
  connection: nothing reached the upstream's application, so the retry cannot run a
  model twice. Any other failure is not retried and is a :class:`BackendError` (502);
* framing by ``Content-Length``, chunked, or the end of the connection.

Only the worker's rebuilt calls use it (:class:`RawCandidate` wraps the candidate's
``HttpBackend``; metadata, identity and everything else stay the backend's).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httptools
import numpy as np

from proxy.backends.http import HttpBackend, Reply, ssl_context
from proxy.core.errors import BackendError, BackendTimeout
from proxy.protocol.base import ModelIdentity, ModelMetadata
from proxy.protocol.headers import end_to_end

MAX_IDLE = 256


class _Stale(Exception):
    """The connection ended before any response byte."""


class _Conn(asyncio.Protocol):
    """One connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[Reply, bool]] | None = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.received = False
        self.complete_headers = False
        self.eof_framed = False
        self.reason = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BackendError(f"malformed response: {exc}"))
            self._abort()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost decides what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is None or self.waiter.done():
            return
        if not self.received:
            self._fail(_Stale())
        elif self.complete_headers and self.eof_framed:
            self._complete(False)  # the body ran to the end of the connection
        else:
            self._fail(BackendError(f"connection lost mid-response: {exc!r}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self.received = True

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete_headers = True
        names = {k.lower() for k, _ in self.headers}
        self.eof_framed = "content-length" not in names and "transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._complete(self.parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._reset()
            self.received = True  # the upstream has the request: never retried now
            return
        connection = next((v for k, v in self.headers if k.lower() == "connection"), None)
        reply = Reply(
            status,
            self.reason.decode("latin-1") or None,
            end_to_end(self.headers, connection),
            b"".join(self.body),
        )
        waiter.set_result((reply, keep_alive))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes) -> asyncio.Future[tuple[Reply, bool]]:
        assert self.transport is not None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class CandidateClient:
    """A keep-alive pool to one upstream (``http``/``https`` URL)."""

    def __init__(self, url: str, *, tls: Any = None, max_idle: int = MAX_IDLE) -> None:
        parts = urlsplit(url)
        self.base_url = url.rstrip("/")
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = tls
        self._host_header = parts.netloc.rsplit("@", 1)[-1].encode("idna")
        self._idle: list[_Conn] = []
        self._max_idle = max_idle

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Conn,
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host if self._tls is not None else None,
        )
        return conn

    def _head(self, path: str, headers: list[tuple[str, str]], length: int) -> bytes:
        lines = [
            b"POST " + path.encode("ascii") + b" HTTP/1.1",
            b"Host: " + self._host_header,
            b"Content-Length: " + str(length).encode("ascii"),
        ]
        for name, value in headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
                raise BackendError(f"a header the upstream cannot be sent: {name!r}", status=400)
            lines.append(
                name.encode("utf-8", "surrogateescape")
                + b": "
                + value.encode("utf-8", "surrogateescape")
            )
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    async def _once(self, conn: _Conn, data: bytes) -> Reply:
        waiter = conn.send(data)
        try:
            reply, keep_alive = await waiter
        except BaseException:
            # a deadline, a cancel or a failure mid-exchange: never reused
            conn._abort()
            raise
        if keep_alive and not conn.lost and len(self._idle) < self._max_idle:
            conn.waiter = None
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.lost = True
            conn.transport.close()
        return reply

    async def post(
        self, path: str, headers: list[tuple[str, str]], body: bytes, timeout_s: float
    ) -> Reply:
        data = self._head(path, headers, len(body)) + body
        try:
            async with asyncio.timeout(timeout_s):
                conn = None
                while self._idle:
                    candidate = self._idle.pop()
                    if not candidate.lost:
                        conn = candidate
                        break
                if conn is not None:
                    try:
                        return await self._once(conn, data)
                    except _Stale:
                        pass  # closed by the upstream while idle: once on a fresh one
                try:
                    return await self._once(await self._connect(), data)
                except _Stale as exc:
                    raise BackendError(
                        f"upstream {self.base_url} closed the connection without answering"
                    ) from exc
        except TimeoutError as exc:
            raise BackendTimeout(
                f"upstream {self.base_url} timed out after {timeout_s * 1000:g} ms"
            ) from exc
        except OSError as exc:
            raise BackendError(f"upstream {self.base_url} connection failed: {exc!r}") from exc

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()


def supports(backend: HttpBackend) -> bool:
    """Whether the raw pool sends what aiohttp would for this backend: not for a URL
    carrying credentials (aiohttp turns them into basic auth; the pool does not)."""
    parts = urlsplit(backend.base_url)
    return parts.scheme in ("http", "https") and parts.username is None


class RawCandidate:
    """An :class:`HttpBackend` whose rebuilt ``infer`` calls go through the raw pool."""

    def __init__(self, backend: HttpBackend) -> None:
        self.backend = backend
        parts = urlsplit(backend.infer_url)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.client = CandidateClient(backend.base_url, tls=ssl_context(backend.settings))

    @property
    def metadata(self) -> ModelMetadata:
        return self.backend.metadata

    @property
    def identity(self) -> ModelIdentity:
        return self.backend.identity

    def __getattr__(self, name: str) -> Any:
        # settings, model, base_url, binary, forward...: the wrapped backend's
        return getattr(self.backend, name)

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        body, headers = self.backend.infer_request(inputs, outputs)
        reply = await self.client.post(self._path, headers, body, self.backend.timeout_s)
        return await self.backend.infer_result(reply, outputs)

    async def aclose(self) -> None:
        self.client.close()
        await self.backend.aclose()
