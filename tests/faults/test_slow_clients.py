"""Slow and greedy clients against a real ``mirrorgate serve`` process.

Every wait is on a condition with a generous deadline (the server closing the socket,
an answer arriving); the configured timeouts are short so the test is quick, but no
assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.faults.helpers import ready, start_serve, stop, until
from tests.proxy.conftest import LIVE_PATHS, N_FEATURES

INFER = "/v2/models/classifier/infer"


def _config(champion: str, live_path: str, **limits: Any) -> dict[str, Any]:
    model = {"name": "champion", "kind": "http", "url": champion, "model": "model"}
    return {
        "server": {"model_name": "classifier", "limits": limits, "live_path": live_path},
        "models": {"champion": {**model, "timeout_ms": 60000}},
        "storage": {"url": "sqlite:///pairs.sqlite"},
    }


async def _open(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(base)
    return await asyncio.open_connection(url.hostname, url.port)


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (60 s at most)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 60):
            data += chunk
    return data


async def _infer_ok(base: str) -> bool:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}{INFER}", json=doc) as resp:
                return resp.status in (200, 400)  # answered (the shape may not fit)
    except aiohttp.ClientError:
        return False


@pytest.mark.parametrize("live_path", LIVE_PATHS)
async def test_idle_partial_and_slow_body_connections_are_closed(
    start_upstream: Any, tmp_path: Path, live_path: str
) -> None:
    champion = await start_upstream(seed=1)
    proc, base = await start_serve(
        _config(champion.url, live_path, keepalive_timeout_s=0.5, body_timeout_s=0.5), tmp_path
    )
    try:
        await until(lambda: ready(base), "proxy ready")
        idle = await _open(base)
        partial_line = await _open(base)
        partial_line[1].write(b"POST /v2/models/classif")
        partial_headers = await _open(base)
        partial_headers[1].write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Ty".encode())
        slow_body = await _open(base)
        slow_body[1].write(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        # each is closed by the server; the slow body gets a 408 first
        for reader, _ in (idle, partial_line, partial_headers):
            assert await _closed_by_server(reader) == b""
        answer = await _closed_by_server(slow_body[0])
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body_timeout_s" in answer
        assert await _infer_ok(base)  # and it still serves
    finally:
        await stop(proc)


@pytest.mark.parametrize("live_path", LIVE_PATHS)
async def test_connections_over_the_cap_are_shed_and_logging_stays_bounded(
    start_upstream: Any, tmp_path: Path, live_path: str
) -> None:
    cap, n = 6, 40
    champion = await start_upstream(seed=1)
    proc, base = await start_serve(
        _config(champion.url, live_path, max_connections=cap, keepalive_timeout_s=120), tmp_path
    )
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    shed_while_filling = 0
    request = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + BODY
    try:
        await until(lambda: ready(base), "proxy ready")
        champion.upstream.set_fault("hold")
        # Fill every slot with a request parked in the champion (a slot still held by
        # the readiness probe sheds an attempt: count it and try again).
        while champion.upstream.stats.in_flight < cap:
            reader, writer = await _open(base)
            writer.write(request)
            got = await _started_or_closed(champion.upstream, len(held) + 1, reader)
            if got is None:
                held.append((reader, writer))
            else:
                assert got.startswith(b"HTTP/1.1 503"), got[:200]
                shed_while_filling += 1
        answers = []
        for _ in range(n):
            reader, writer = await _open(base)
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers.append(await _closed_by_server(reader))
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:2]
        assert all(b"too many open connections" in a for a in answers)
        # the parked requests are answered; the proxy serves again and counted exactly
        champion.upstream.release()
        for reader, _ in held:
            assert (await _closed_by_server(reader)).startswith(b"HTTP/1.1 200")
        await until(lambda: _infer_ok(base), "served again")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        shed_total = float(n + shed_while_filling)
        assert f"mirrorgate_server_connections_shed_total {shed_total}" in metrics
    finally:
        champion.upstream.release()
        for _, writer in held:
            writer.close()
        stderr = await stop(proc)
    # the shed connections wrote no log line each (nothing per connection at all)
    assert stderr.count("too many") < n, stderr[-2000:]


BODY = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, %d], "data": [%s]}]}' % (
    N_FEATURES,
    ", ".join(["0.5"] * N_FEATURES).encode(),
)


async def _started_or_closed(
    upstream: Any, started: int, reader: asyncio.StreamReader
) -> bytes | None:
    """None once the upstream has ``started`` parked calls; else what the proxy sent
    before closing this connection (a shed)."""
    read = asyncio.ensure_future(_closed_by_server(reader))
    wait = asyncio.ensure_future(upstream.wait_for(started=started))
    done, _ = await asyncio.wait({read, wait}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if wait in done:
        read.cancel()
        return None
    wait.cancel()
    assert read in done, "neither parked nor answered"
    return read.result()
