"""The raw champion pool (proxy/backends/rawhttp.py) against real loopback servers:
framing (length, chunked, end of connection), the stale-connection retry, errors, TLS,
and the latency taken from the kernel's receive timestamps."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.backends.rawhttp import (
    SCM_TIMESTAMPNS,
    SO_TIMESTAMPNS,
    RawPool,
    header_lines,
    request_head,
)
from proxy.core.errors import BackendError, BackendTimeout

Answer = Callable[[int, int], bytes | None]  # (connection no., request no.) -> bytes, None: close


async def _server(answer: Answer) -> tuple[asyncio.Server, str, list[int]]:
    """A raw HTTP/1.1 server: reads Content-Length requests, writes what ``answer`` says."""
    per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        me = len(per_connection) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                per_connection[me] += 1
                out = answer(me, per_connection[me])
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", per_connection


def _head(pool: RawPool) -> bytes:
    return request_head(b"POST", b"/v2/models/m/infer", pool.host_header, [], 2)


LINUX = sys.platform == "linux"  # where the kernel stamps received segments


@pytest.fixture(autouse=True, scope="module")
def _kernel_stamping_on() -> Iterator[None]:
    """Linux turns receive timestamping on for the whole stack lazily: a deferred work
    item runs when the first socket asks for it (and it goes off again after the last
    such socket closes). A segment that arrives before that carries no stamp and the
    pool falls back to ``perf_counter``, as it should (``RawReply.stamped`` False); on a
    machine where no other socket stamps, that is a pool's first answers. The tests
    here that assert a stamp hold one stamping socket open for the module and wait until
    a loopback segment is stamped, so the stack's state is not what they race."""
    if not LINUX:
        yield
        return
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        server.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        for _ in range(1000):
            client.sendall(b"x")
            _, ancillary, _, _ = server.recvmsg(64, socket.CMSG_SPACE(16))
            if any(
                lvl == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS for lvl, kind, _ in ancillary
            ):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the kernel stamped no loopback segment in 10 s")
        yield
    finally:
        client.close()
        server.close()
        listener.close()


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    # The first request on each connection is answered; a second is met with a close
    # before any byte: what an upstream that dropped an idle connection looks like.
    server, url, per_connection = await _server(lambda conn, n: OK if n == 1 else None)
    pool = RawPool(url)
    try:
        first = await pool.request(_head(pool), b"{}", 10)
        second = await pool.request(_head(pool), b"{}", 10)
        assert first.status == second.status == 200 and second.body == b'{"ok":true}'
        assert per_connection == [2, 1]  # met the closed one, then went out on a new one
    finally:
        pool.close()
        server.close()


async def test_a_fresh_connection_that_closes_unanswered_is_not_retried() -> None:
    server, url, per_connection = await _server(lambda conn, n: None)
    pool = RawPool(url)
    try:
        with pytest.raises(BackendError, match="connection failed"):
            await pool.request(_head(pool), b"{}", 10)
        assert per_connection == [1]
    finally:
        pool.close()
        server.close()


async def _answer_once(answer: bytes) -> tuple[asyncio.Server, RawPool]:
    """A server that reads one 2-byte request, writes ``answer`` and closes; a pool to it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")


async def test_mid_response_loss_is_an_error_not_a_retry() -> None:
    server, pool = await _answer_once(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"half')
    try:
        with pytest.raises(BackendError, match="mid-response"):
            await pool.request(_head(pool), b"{}", 10)
    finally:
        pool.close()
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"ok\r\n7\r\n":true}\r\n0\r\n\r\n',
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    ],
    ids=["chunked", "interim-100"],
)
async def test_framing(answer: bytes) -> None:
    server, url, _ = await _server(lambda conn, n: answer)
    pool = RawPool(url)
    try:
        for _ in range(2):  # and the connection is reusable after it
            reply = await pool.request(_head(pool), b"{}", 10)
            assert (reply.status, reply.body, reply.keep_alive) == (200, b'{"ok":true}', True)
            # the final answer's last segment is stamped (not the interim one's)
            assert reply.stamped is LINUX and reply.latency_s > 0
    finally:
        pool.close()
        server.close()


async def test_body_ended_by_the_connection_close() -> None:
    server, pool = await _answer_once(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b'{"ok":true}'
    )
    try:
        reply = await pool.request(_head(pool), b"{}", 10)
        assert (reply.status, reply.body, reply.keep_alive) == (200, b'{"ok":true}', False)
        # the end of the connection carries no stamp: the last data segment's is used
        assert reply.stamped is LINUX and reply.latency_s > 0
    finally:
        pool.close()
        server.close()


async def test_refused_and_deadline() -> None:
    server, url, _ = await _server(lambda conn, n: OK)
    server.close()
    await server.wait_closed()
    pool = RawPool(url)
    with pytest.raises(BackendError, match="connection failed") as refused:
        await pool.request(_head(pool), b"{}", 10)
    assert refused.value.status == 502

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    quiet = await asyncio.start_server(hang, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{quiet.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(BackendTimeout, match="timed out after 50 ms") as late:
            await pool.request(_head(pool), b"{}", 0.05)
        assert late.value.status == 504
    finally:
        pool.close()
        quiet.close()


async def test_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    from proxy.backends.http import ssl_context
    from proxy.core.config import BackendSettings
    from tests.proxy.dataplane.test_passthrough import _make_pki

    _make_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    files = {"ca_file": str(tmp_path / "ca.pem")}
    mtls = {
        **files,
        "cert_file": str(tmp_path / "client.pem"),
        "key_file": str(tmp_path / "client.key"),
    }
    try:
        for upstream, works in ((mtls, True), (files, False), ({}, False)):
            settings = BackendSettings(name="t", kind="http", url=url, model="m", upstream=upstream)
            pool = RawPool(url, ssl_context=ssl_context(settings))
            try:
                if works:
                    reply = await pool.request(_head(pool), b"{}", 10)
                    assert reply.body == b'{"ok":true}'
                    # TLS keeps asyncio's transport: timed with perf_counter
                    assert reply.stamped is False and reply.latency_s > 0
                else:
                    with pytest.raises(BackendError):
                        await pool.request(_head(pool), b"{}", 10)
            finally:
                pool.close()
    finally:
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        # an interim answer, then the connection is lost: the upstream had the request
        b"HTTP/1.1 100 Continue\r\n\r\n",
        # the connection is lost inside the head: no end-of-connection body
        b"HTTP/1.1 200 OK\r\nContent-Type: text/pl",
    ],
    ids=["after-100", "inside-head"],
)
async def test_a_loss_after_the_first_byte_is_an_error_and_never_retried(answer: bytes) -> None:
    # The second request goes out on a reused connection, where a loss before any byte
    # would be retried: after these bytes it must not be (nor read as a reply).
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(0)
        try:
            for out in (OK, answer):
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                connections[-1] += 1
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        assert (await pool.request(_head(pool), b"{}", 10)).status == 200
        with pytest.raises(BackendError, match="connection failed") as err:
            await pool.request(_head(pool), b"{}", 10)
        assert err.value.status == 502
        assert connections == [2]  # no second connection: not retried
    finally:
        pool.close()
        server.close()


def test_a_header_that_would_split_the_request_is_refused_before_sending() -> None:
    assert header_lines([("X-Ok", "a b")]) == [b"X-Ok: a b"]
    for bad in [("X-Evil", "a\r\nX-Injected: 1"), ("X-Evil", "a\nb"), ("X:Evil", "a")]:
        with pytest.raises(BackendError) as err:
            header_lines([bad])
        assert err.value.status == 400


async def test_idle_connections_are_capped_by_max_idle() -> None:
    arrived: list[int] = []
    all_in = asyncio.Event()  # four requests held at once: four connections

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                arrived.append(1)
                if len(arrived) == 4:
                    all_in.set()
                await all_in.wait()
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", max_idle=2)
    try:
        calls = [asyncio.ensure_future(pool.request(_head(pool), b"{}", 10)) for _ in range(4)]
        await asyncio.wait_for(all_in.wait(), 60)
        assert len(pool._all) == 4
        for reply in await asyncio.gather(*calls):
            assert reply.status == 200
        assert len(pool._idle) == 2  # the other two were closed, not kept
    finally:
        pool.close()
        server.close()


async def test_close_lets_an_exchange_in_flight_finish_then_closes_its_connection() -> None:
    # The front replaces its pool when the champion changes, with requests in flight.
    arrived = asyncio.Event()
    release = asyncio.Event()
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                served.append(1)
                arrived.set()
                await release.wait()
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        await asyncio.wait_for(
            asyncio.gather(pool.request(_head(pool), b"{}", 10), _go(release)), 60
        )
        assert len(pool._idle) == 1  # one idle connection, then one busy with a request
        release.clear()
        arrived.clear()
        call = asyncio.ensure_future(pool.request(_head(pool), b"{}", 10))
        await asyncio.wait_for(arrived.wait(), 60)
        pool.close()
        release.set()
        reply = await call
        assert (reply.status, reply.body) == (200, b'{"ok":true}')
        assert len(served) == 2  # answered on its own connection: not sent again
        assert pool._idle == [] and all(
            c.transport is None or c.transport.is_closing() for c in pool._all
        )
    finally:
        pool.close()
        server.close()


async def _go(event: asyncio.Event) -> None:
    event.set()


BLOCK_S = 1.5  # how long the measuring side's event loop is kept from reading


@pytest.mark.skipif(not LINUX, reason="kernel receive timestamps (SO_TIMESTAMPNS) are Linux's")
async def test_latency_is_when_the_answer_arrived_not_when_a_blocked_loop_read_it() -> None:
    # The upstream is a thread with blocking sockets, so it answers while this event
    # loop is blocked (as a descheduled or niced worker's would be). It notes the wall
    # clock after each answer left: on loopback the segment is in our receive queue,
    # stamped, by the time sendall returns.
    listener = socket.create_server(("127.0.0.1", 0))
    answered = threading.Event()
    answered_at: list[float] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            seen = b""
            for n in (1, 2):
                while seen.count(b"\r\n\r\n{}") < n:  # each request: head, then b"{}"
                    seen += conn.recv(65536)
                conn.sendall(OK)
                answered_at.append(time.time())
            answered.set()
            conn.recv(1)  # until the pool closes the connection

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = RawPool(f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        await pool.request(_head(pool), b"{}", 30)  # a kept connection: start() sends now
        perf_start, wall_start = time.perf_counter(), time.time()
        pending = pool.start(_head(pool), b"{}", 30)
        # Block the loop (no await) until the answer is in the socket, then for BLOCK_S.
        assert answered.wait(60)
        time.sleep(BLOCK_S)  # noqa: ASYNC251 - blocking the loop is the point
        reply = await pending
        around_the_await = time.perf_counter() - perf_start
    finally:
        pool.close()
        listener.close()
    await asyncio.to_thread(thread.join, 60)  # the pool closes its connection meanwhile
    assert not thread.is_alive()
    assert reply.status == 200 and reply.stamped
    # What perf_counter around the await says includes the whole block ...
    assert around_the_await >= BLOCK_S
    # ... the stamp does not: it is no later than the answer left the upstream, and
    # the two measurements of this one exchange differ by at least the block.
    assert 0 < reply.latency_s <= answered_at[1] - wall_start
    assert around_the_await - reply.latency_s >= BLOCK_S * 0.99


async def test_a_body_larger_than_the_socket_buffers_is_sent_whole() -> None:
    # 16 MiB cannot go out in one send(): the rest waits for the socket to be writable
    # (the stamped transport's own write path). The upstream answers with what it read.
    size = 16 << 20
    got: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        got.append(len(body))
        text = b"%d:%d" % (len(body), body.count(b"x"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        head = request_head(b"POST", b"/v2/models/m/infer", pool.host_header, [], size)
        reply = await pool.request(head, b"x" * size, 60)
        assert reply.status == 200 and reply.body == b"%d:%d" % (size, size)
        assert got == [size]
    finally:
        pool.close()
        server.close()
