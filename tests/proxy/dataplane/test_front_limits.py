"""Slow and greedy clients on the byte-level front's fast path, and its clean stop.

Short configured timeouts; every wait is on a condition (the server closing the socket,
an answer arriving) with a generous deadline, never on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tests.proxy.conftest import Proxy, make_config, serve_proxy

INFER = "/v2/models/classifier/infer"
BODY = b'{"id": "s1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5, 0.5, 0.5, 0.5]}]}'  # noqa: E501


async def _open(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = proxy.client.server
    return await asyncio.open_connection(server.host, server.port)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 60):
            data += chunk
    return data


def _head(length: int, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


async def test_idle_partial_head_and_slow_body_are_closed(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    champion = await start_upstream(seed=1)
    limits = {"keepalive_timeout_s": 0.3, "body_timeout_s": 0.3}
    proxy = await serve_proxy(
        aiohttp_client, make_config(champion.url, server={"limits": limits}), "bytes"
    )
    idle = await _open(proxy)
    partial = await _open(proxy)
    partial[1].write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Ty".encode())
    after_one = await _open(proxy)  # idle again after an answered request
    after_one[1].write(_head(len(BODY)) + BODY)
    slow = await _open(proxy)
    slow[1].write(_head(1000) + b"{")
    for reader, _ in (idle, partial):
        assert await _until_closed(reader) == b""
    answered = await _until_closed(after_one[0])
    assert answered.startswith(b"HTTP/1.1 200 OK") and answered.count(b"HTTP/1.1") == 1
    answer = await _until_closed(slow[0])
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
    assert b"Connection: close" in answer
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert doc == {"error": "request body not received within 0.3 s (server.limits.body_timeout_s)"}
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="408") == 1
    assert proxy.front is not None and proxy.front.spliced == 0
    ok = await proxy.client.post(INFER, data=BODY)
    assert ok.status == 200  # and it still serves


async def test_connections_over_the_cap_are_shed_with_a_503(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    champion = await start_upstream(seed=1)
    cap = 3
    config = make_config(
        champion.url, server={"limits": {"max_connections": cap, "keepalive_timeout_s": 120}}
    )
    proxy = await serve_proxy(aiohttp_client, config, "bytes")
    champion.upstream.set_fault("hold")
    held = []
    for i in range(cap):  # every slot holds a request parked in the champion
        reader, writer = await _open(proxy)
        writer.write(_head(len(BODY), close=True) + BODY)
        held.append((reader, writer))
        await champion.upstream.wait_for(started=i + 1)
    shed = []
    for _ in range(5):
        reader, writer = await _open(proxy)
        shed.append(await _until_closed(reader))
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 503") and b"too many open connections" in a for a in shed)
    assert proxy.metric("mirrorgate_server_connections_shed_total") == 5
    champion.upstream.release()
    for reader, _ in held:
        assert (await _until_closed(reader)).startswith(b"HTTP/1.1 200 OK")


async def test_stop_answers_the_request_in_hand_and_closes_idle_connections(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    champion = await start_upstream(seed=1)
    proxy = await serve_proxy(aiohttp_client, make_config(champion.url), "bytes")
    front = proxy.front
    assert front is not None
    idle = await _open(proxy)
    busy = await _open(proxy)
    champion.upstream.set_fault("hold")
    busy[1].write(_head(len(BODY)) + BODY)  # keep-alive asked for
    await champion.upstream.wait_for(started=1)
    front.stop_accepting()
    assert await _until_closed(idle[0]) == b""
    drained = asyncio.ensure_future(front.drain(60))
    champion.upstream.release()
    answer = await _until_closed(busy[0])
    await drained
    # answered, told the connection ends, then closed
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
    try:
        await _open(proxy)
    except OSError:
        pass
    else:
        raise AssertionError("still accepting after stop_accepting")
