"""``RawPool.begin`` (the live front's task-free call) gives what ``RawPool.request``
gives, against the same real loopback servers: the reply, the stale-connection retry,
the same errors in the same words, and a callback that is never called from inside
``begin`` itself (the front sets the request's id after ``begin`` returns)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.backends.rawhttp import RawPool, RawReply
from proxy.core.errors import BackendError, BackendTimeout, MirrorgateError
from tests.proxy.backends.test_rawhttp import OK, _head, _server


async def _begin(pool: RawPool, body: bytes, timeout_s: float) -> RawReply:
    """``begin``'s outcome as ``request`` has it (reply or raised error)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[RawReply] = loop.create_future()
    calls: list[bool] = []  # whether each call came from inside begin()
    inside = True

    def done(reply: RawReply | None, error: MirrorgateError | None) -> None:
        calls.append(inside)
        if outcome.done():
            return
        if error is not None:
            outcome.set_exception(error)
        else:
            assert reply is not None
            outcome.set_result(reply)

    pool.begin(_head(pool), body, timeout_s, done)
    inside = False
    try:
        return await asyncio.wait_for(outcome, 60)
    finally:
        for _ in range(5):  # a second call would come in the next loop iterations
            await asyncio.sleep(0)
        assert calls == [False]


async def test_replies_on_a_kept_connection_and_reuses_it() -> None:
    server, url, per_connection = await _server(lambda conn, n: OK)
    pool = RawPool(url)
    try:
        for _ in range(3):
            reply = await _begin(pool, b"{}", 10)
            assert (reply.status, reply.body, reply.keep_alive) == (200, b'{"ok":true}', True)
        assert per_connection == [3]
        assert not pool._tasks  # the connecting task ended and was let go
    finally:
        pool.close()
        server.close()


async def test_stale_kept_connection_is_retried_once_on_a_fresh_one() -> None:
    server, url, per_connection = await _server(lambda conn, n: OK if n == 1 else None)
    pool = RawPool(url)
    try:
        first = await _begin(pool, b"{}", 10)
        second = await _begin(pool, b"{}", 10)
        assert first.status == second.status == 200 and second.body == b'{"ok":true}'
        assert per_connection == [2, 1]
    finally:
        pool.close()
        server.close()


async def test_same_errors_in_the_same_words_as_request() -> None:
    server, url, _ = await _server(lambda conn, n: None)  # closes every request unanswered
    pool = RawPool(url)
    try:
        with pytest.raises(BackendError) as via_request:
            await pool.request(_head(pool), b"{}", 10)
        with pytest.raises(BackendError) as via_begin:
            await _begin(pool, b"{}", 10)
        assert str(via_begin.value) == str(via_request.value)
        assert "without answering" in str(via_begin.value)
    finally:
        pool.close()
        server.close()
    server.close()
    await server.wait_closed()
    with pytest.raises(BackendError, match="connection failed") as refused:
        await _begin(RawPool(url), b"{}", 10)
    assert refused.value.status == 502


async def test_deadline_on_a_kept_connection_aborts_it() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(OK)  # the first is answered: the connection is kept
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second never is
        await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = RawPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        assert (await _begin(pool, b"{}", 10)).status == 200
        (kept,) = pool._idle
        with pytest.raises(BackendTimeout, match="timed out after 50 ms") as late:
            await _begin(pool, b"{}", 0.05)
        assert late.value.status == 504
        assert kept.transport is None or kept.transport.is_closing()  # never reused
        assert not pool._idle
    finally:
        pool.close()
        server.close()
