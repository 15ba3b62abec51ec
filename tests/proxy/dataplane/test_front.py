"""The byte-level live path (proxy/dataplane/front.py) answers as the aiohttp path does.

Each comparison runs the same raw request bytes through both live paths in front of the
same real upstream and compares the raw answers (status line, headers but ``Date``,
body bytes), then the pairs both recorded. The front's own counters say which path
answered (fast path, relayed to the aiohttp app for one request, or spliced to it for
the rest of the connection), so a test cannot pass by accident on the wrong one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from typing import Any

import numpy as np
import pytest

from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request
from tests.proxy.conftest import N_FEATURES, Proxy, make_config, serve_proxy

INFER = "/v2/models/classifier/infer"


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


def _json(x: np.ndarray, **extra: Any) -> bytes:
    data = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [data], **extra}).encode()


def _request(
    body: bytes, headers: dict[str, str] | None = None, path: str = INFER, close: bool = True
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: proxy", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _exchange(proxy: Proxy, raw: bytes, *, one: bool = False) -> bytes:
    """Send ``raw`` on a new connection; everything answered until the server closes.

    ``one``: only the first answer (head and ``Content-Length`` body), then the client
    closes. A request whose announced body never comes (the over-limit cases) is
    answered and then held open by aiohttp's lingering read for 10 s on each proxy."""
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    if one:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        length = int(dict(_normal(head)[1]).get(b"content-length", b"0"))
        body = await asyncio.wait_for(reader.readexactly(length), 60)
        writer.close()
        return head + body
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 60):
        data += chunk
    writer.close()
    return data


def _normal(answer: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Status line, headers (lower-case names, sorted, ``Date`` aside) and body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip()
        if name == b"x-request-id" and re.fullmatch(rb"[0-9a-f]{32}", value):
            value = b"<generated>"  # each proxy generates its own
        if name != b"date":
            headers.append((name, value))
    return status, sorted(headers), body


async def _both(aiohttp_client: Any, config: Any, **kwargs: Any) -> tuple[Proxy, Proxy]:
    slow = await serve_proxy(aiohttp_client, config, "aiohttp", **kwargs)
    fast = await serve_proxy(aiohttp_client, config, "bytes", **kwargs)
    assert fast.front is not None and slow.front is None
    return slow, fast


async def _settled(proxy: Proxy, n: int) -> None:
    assert proxy.state is not None
    for _ in range(3000):
        if len(proxy.sink.records) >= n and proxy.state.mirror.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(proxy.sink.records)} pairs, expected {n}")


def _pairs(proxy: Proxy) -> list[dict[str, Any]]:
    """The recorded pairs without what differs by construction (time, latency)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "ts" and "latency" not in k}
        if isinstance(value, np.ndarray):
            return value.tolist()
        return value

    return sorted((strip(r.to_dict()) for r in proxy.sink.records), key=lambda d: d["id"])


def _bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    x = _x(2, seed=3)
    binary, hl = encode_infer_request({"x": x}, request_id="bin-1", binary=True)
    plain = _json(x, id="gz-1")
    return {
        "json": (_json(x, id="json-1"), {"Content-Type": "application/json"}),
        "binary": (binary, {HEADER_LENGTH: str(hl)}),
        "gzip": (gzip.compress(plain, mtime=0), {"Content-Encoding": "gzip"}),
        "header-id": (_json(x), {"X-Request-Id": "from-header", "traceparent": "00-a-b-01"}),
    }


@pytest.mark.parametrize("kind", list(_bodies()))
async def test_fast_path_answers_and_pairs_exactly_as_the_aiohttp_path(
    aiohttp_client: Any, start_upstream: Any, kind: str
) -> None:
    champion = await start_upstream(seed=1, raw_bodies=True)
    candidate = await start_upstream(seed=2)
    config = make_config(champion.url, candidate.url, storage={"capture": "all"})
    slow, fast = await _both(aiohttp_client, config)
    body, headers = _bodies()[kind]
    raw = _request(body, {**headers, "X-Tenant": "acme", "Authorization": "Bearer t"})
    answers = [_normal(await _exchange(p, raw)) for p in (slow, fast)]
    assert answers[0] == answers[1]
    status, got_headers, got = answers[1]
    assert status == b"HTTP/1.1 200 OK", got[:300]
    # Both sent the champion the same request (the id each generated aside).
    (first, second) = champion.upstream.received
    assert first[1] == second[1] == body
    assert {k: v for k, v in first[0].items()} == {k: v for k, v in second[0].items()}
    assert first[0]["X-Tenant"] == "acme" and first[0]["Authorization"] == "Bearer t"
    # ... and what the champion answers the same bytes directly.
    direct = await fast.client.session.post(
        f"{champion.url}/v2/models/model/infer", data=body, headers=headers
    )
    assert got == await direct.read()
    assert (b"x-mirrorgate-served-by", b"champion") in got_headers
    assert fast.front is not None and (fast.front.answered, fast.front.spliced) == (1, 0)
    rows = 2
    await _settled(slow, rows)
    await _settled(fast, rows)
    if kind == "header-id":
        assert {r["id"] for r in _pairs(fast)} == {"from-header#0", "from-header#1"}
    assert _pairs(slow) == _pairs(fast)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v2/models/classifier HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET /v2/health/ready HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET /v2/models/classifier/ready HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET /v2/nothing/here HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET /elsewhere HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET /v1/rollout HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer nope\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /v1/rollout HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
        b'Connection: close\r\n\r\n4\r\n{"in\r\n0\r\n\r\n',
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
        b"Content-Length: 99999999\r\nConnection: close\r\n\r\n",
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999\r\n"
        b"Connection: close\r\n\r\n",
        b"POST /v2/models/other/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
        b"PUT /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\n{}",
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: p\r\nBad Header: x\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=[
        "metadata",
        "health",
        "model-ready",
        "v2-other",
        "404",
        "bad-token",
        "no-token",
        "chunked",
        "expect-over-limit",
        "over-limit",
        "other-model",
        "put",
        "two-lengths",
        "bad-header",
        "garbage",
    ],
)
async def test_everything_else_is_the_aiohttp_apps_answer(
    aiohttp_client: Any, start_upstream: Any, raw: bytes
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        server={"control_token": "secret", "max_body_bytes": 1 << 20},
    )
    slow, fast = await _both(aiohttp_client, config)
    one = b"Content-Length: 99999999" in raw  # its body never comes
    answers = [_normal(await _exchange(p, raw, one=one)) for p in (slow, fast)]
    if one:
        assert answers[1][0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert answers[0] == answers[1]
    assert fast.front is not None and (fast.front.answered, fast.front.spliced) == (0, 1)
    if b"Bearer nope" in raw:
        assert answers[1][0].startswith(b"HTTP/1.1 401")
        assert any(name == b"www-authenticate" for name, _ in answers[1][1])


async def test_one_connection_comes_back_to_the_fast_path_after_a_relayed_request(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await serve_proxy(aiohttp_client, make_config(champion.url, candidate.url), "bytes")
    await _one_connection(proxy)


async def _one_connection(proxy: Proxy) -> None:
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    x = _x(1)
    for i in range(2):
        writer.write(_request(_json(x, id=f"k{i}"), close=False))
        status, headers, _ = await _read_one(reader)
        assert status == b"HTTP/1.1 200 OK" and (b"x-request-id", f"k{i}".encode()) in headers
    writer.write(b"GET /v2/models/classifier HTTP/1.1\r\nHost: p\r\n\r\n")
    status, _, body = await _read_one(reader)
    assert status == b"HTTP/1.1 200 OK" and json.loads(body)["name"] == "model"
    writer.write(_request(_json(x, id="k2"), close=False))
    status, headers, _ = await _read_one(reader)
    assert status == b"HTTP/1.1 200 OK" and (b"x-request-id", b"k2") in headers
    writer.close()
    assert proxy.front is not None
    # The metadata GET was the aiohttp app's; the infer after it is the fast path's again
    # (a client that checks readiness or metadata first must not lose the fast path).
    assert (proxy.front.answered, proxy.front.relayed, proxy.front.spliced) == (3, 1, 0)


async def _read_one(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    status, headers, _ = _normal(head)
    length = int(dict(headers).get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(length), 60)
    return status, headers, body


async def test_pipelined_and_http10_requests(aiohttp_client: Any, start_upstream: Any) -> None:
    champion = await start_upstream(seed=1)
    slow, fast = await _both(aiohttp_client, make_config(champion.url))
    x = _x(1)
    pipelined = _request(_json(x, id="p0"), close=False) + _request(_json(x, id="p1"))
    http10 = _request(_json(x, id="old"), close=False).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    for raw in (pipelined, http10):
        answers = [await _exchange(p, raw) for p in (slow, fast)]
        assert _split(answers[0]) == _split(answers[1])
    answer = await _exchange(fast, pipelined)
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.index(b"X-Request-Id: p0") < answer.index(b"X-Request-Id: p1")
    assert (await _exchange(fast, http10)).startswith(b"HTTP/1.0 200 OK")
    assert fast.front is not None and fast.front.spliced == 0 and fast.front.answered == 6


def _mixed(x: np.ndarray) -> list[bytes]:
    """Keep-alive requests of every kind on one connection, the last one closing it."""
    get = "GET {} HTTP/1.1\r\nHost: p\r\n\r\n"
    return [
        get.format("/v2/health/ready").encode(),
        _request(_json(x, id="m0"), close=False),
        get.format("/v2/models/classifier").encode(),
        get.format("/v2/models/classifier/ready").encode(),
        _request(_json(x, id="m1"), close=False),
        # the aiohttp app's error answer keeps the connection; so does the champion's
        _request(b"{}", path="/v2/models/other/infer", close=False),
        _request(b'{"inputs": 3}', close=False),
        get.format("/v2/nothing/here").encode(),
        _request(_json(x, id="m2"), close=False),
        b"OPTIONS /v2 HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n",
        _request(_json(x, id="m3")),
    ]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
async def test_relayed_requests_keep_the_connection_and_answer_as_aiohttp(
    aiohttp_client: Any, start_upstream: Any, pipelined: bool
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    slow, fast = await _both(aiohttp_client, make_config(champion.url, candidate.url))
    requests = _mixed(_x(1))
    if pipelined:
        answers = [_split(await _exchange(p, b"".join(requests))) for p in (slow, fast)]
    else:
        answers = [await _one_by_one(p, requests) for p in (slow, fast)]
    assert answers[0] == answers[1]
    statuses = [status.split(b" ")[1] for status, _, _ in answers[1]]
    # statuses[9]: whatever aiohttp says to OPTIONS (the same on both paths, above)
    expected = [b"200"] * 5 + [b"404", b"400", b"404", b"200", statuses[9], b"200"]
    assert statuses == expected
    assert fast.front is not None
    # answered: the 4 infers and the bad one (the champion's own 400, passed through);
    # relayed: the 6 others, each on the same connection.
    assert (fast.front.answered, fast.front.relayed, fast.front.spliced) == (5, 6, 0)
    await _settled(fast, 4)
    assert {r.to_dict()["id"] for r in fast.sink.records} == {"m0", "m1", "m2", "m3"}


async def _one_by_one(proxy: Proxy, requests: list[bytes]) -> list[Any]:
    """Each request on one connection, the next sent once the answer is read."""
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    out = []
    for raw in requests:
        writer.write(raw)
        status, headers, body = await _read_one(reader)
        out.append((status, sorted((k, v) for k, v in headers if k != b"date"), body))
    assert await asyncio.wait_for(reader.read(), 60) == b""  # the last one closed it
    writer.close()
    return [_normal_one(*answer) for answer in out]


def _normal_one(
    status: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    raw = status + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return _normal(raw + b"\r\n" + body)


async def test_a_request_relay_cannot_frame_splices_the_rest_of_the_connection(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    champion = await start_upstream(seed=1)
    slow, fast = await _both(aiohttp_client, make_config(champion.url))
    x = _x(1)
    chunked = (
        f"POST {INFER} HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"%x\r\n" % len(_json(x, id="c0"))
        + _json(x, id="c0")
        + b"\r\n0\r\n\r\n"
    )
    raw = _request(_json(x, id="f0"), close=False) + chunked + _request(_json(x, id="f1"))
    answers = [_split(await _exchange(p, raw)) for p in (slow, fast)]
    assert answers[0] == answers[1]
    assert [a[0] for a in answers[1]] == [b"HTTP/1.1 200 OK"] * 3
    assert fast.front is not None
    # The chunked request and everything after it went to aiohttp, for good.
    assert (fast.front.answered, fast.front.relayed, fast.front.spliced) == (1, 0, 1)


async def test_an_early_answer_to_a_relayed_body_splices_the_rest(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    """A declared body over the limit is refused (413) before it is sent; what the
    client sends after that is between the client and aiohttp."""
    champion = await start_upstream(seed=1)
    config = make_config(champion.url, server={"max_body_bytes": 1024})
    slow, fast = await _both(aiohttp_client, config)
    head = f"POST {INFER} HTTP/1.1\r\nHost: p\r\nContent-Length: 5000\r\n\r\n".encode()
    answers = []
    for proxy in (slow, fast):
        server = proxy.client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(head + b"x" * 100)
        status, _, body = await _read_one(reader)
        answers.append((status, body))
        writer.close()
    assert answers[0] == answers[1]
    assert answers[1][0].startswith(b"HTTP/1.1 413")
    assert fast.front is not None
    assert (fast.front.answered, fast.front.relayed, fast.front.spliced) == (0, 1, 1)


READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: p\r\n\r\n"


async def _relayed_once(
    start_upstream: Any, aiohttp_client: Any, keepalive_s: float
) -> tuple[Proxy, asyncio.StreamReader, asyncio.StreamWriter, Any, Any]:
    """A connection that had one request relayed: the proxy, the connection, the front's
    client for it and its connection to the aiohttp app."""
    champion = await start_upstream(seed=1)
    config = make_config(champion.url, server={"limits": {"keepalive_timeout_s": keepalive_s}})
    proxy = await serve_proxy(aiohttp_client, config, "bytes")
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(READY)
    assert (await _read_one(reader))[0] == b"HTTP/1.1 200 OK"
    assert proxy.front is not None
    (client,) = proxy.front.clients
    assert client.delegate is not None and client.delegate.transport is not None
    return proxy, reader, writer, client, client.delegate


async def test_the_connection_outlives_an_idle_aiohttp_side(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    """aiohttp closes the front's idle connection to it after its keep-alive timeout
    while the client keeps its own alive on the fast path: the next relayed request
    gets a fresh one, the client's connection is not cut."""
    proxy, reader, writer, client, first = await _relayed_once(start_upstream, aiohttp_client, 1)
    for i in range(400):  # fast-path traffic until aiohttp has dropped its idle side
        writer.write(_request(_json(_x(1), id=f"i{i}"), close=False))
        assert (await _read_one(reader))[0] == b"HTTP/1.1 200 OK"
        if first.transport is None:
            break
        await asyncio.sleep(0.05)
    assert first.transport is None and client.delegate is None
    writer.write(READY)
    assert (await _read_one(reader))[0] == b"HTTP/1.1 200 OK"
    assert client.delegate is not None and client.delegate is not first
    writer.close()
    assert proxy.front is not None
    assert (proxy.front.relayed, proxy.front.spliced) == (2, 0)


async def test_a_long_idle_aiohttp_side_is_replaced_before_a_relayed_request(
    aiohttp_client: Any, start_upstream: Any
) -> None:
    """Past half aiohttp's keep-alive timeout, the front does not send a request on a
    connection aiohttp may be closing at that moment: it opens a fresh one."""
    _, reader, writer, client, first = await _relayed_once(start_upstream, aiohttp_client, 4)
    first.since -= 3  # as if idle for 3 s of aiohttp's 4
    writer.write(READY)
    assert (await _read_one(reader))[0] == b"HTTP/1.1 200 OK"
    assert client.delegate is not None and client.delegate is not first
    assert first.transport is None or first.transport.is_closing()
    writer.close()


def _split(answer: bytes) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
    """Each response of a close-delimited stream of Content-Length responses."""
    out = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status, headers, _ = _normal(head + b"\r\n\r\n")
        length = int(dict(headers).get(b"content-length", b"0"))
        out.append((status, headers, rest[:length]))
        answer = rest[length:]
    return out


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_champion_errors_pass_through_as_written(
    aiohttp_client: Any, start_upstream: Any, status: int
) -> None:
    champion = await start_upstream(seed=1, mode="error", status=status, message="boom")
    candidate = await start_upstream(seed=2)
    slow, fast = await _both(aiohttp_client, make_config(champion.url, candidate.url))
    raw = _request(_json(_x(1), id="e1"))
    answers = [_normal(await _exchange(p, raw)) for p in (slow, fast)]
    assert answers[0] == answers[1]
    assert answers[1][0].startswith(b"HTTP/1.1 %d" % status) and b"boom" in answers[1][2]
    assert fast.metric("mirrorgate_proxy_requests_total", role="champion", code=str(status)) == 1
    await asyncio.sleep(0.05)
    assert candidate.upstream.stats.started == 0 and not fast.sink.records


async def test_champion_refused_is_a_502_error_and_the_server_keeps_serving(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.faults.helpers import own_upstream

    up = await own_upstream(seed=1)
    try:
        proxy = await serve_proxy(aiohttp_client, make_config(up.url), "bytes")
    finally:
        await up.close()  # connection refused from here on
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    with caplog.at_level(logging.WARNING, logger="proxy.dataplane.passthrough"):
        for i in range(2):  # the same connection: still served after the first 502
            writer.write(_request(_json(_x(1)), {"X-Request-Id": f"r{i}"}, close=False))
            status, headers, body = await _read_one(reader)
            assert status == b"HTTP/1.1 502 Bad Gateway"
            assert (b"content-type", b"application/json") in headers
            assert (b"x-request-id", f"r{i}".encode()) in headers
            error = json.loads(body)["error"]
            assert error.startswith(f"champion: upstream {up.url} connection failed")
    writer.close()
    assert any(up.url in r.getMessage() and "502" in r.getMessage() for r in caplog.records)
    metrics = await proxy.client.get("/metrics")
    assert metrics.status == 200
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="502") == 2


async def test_champion_deadline_is_a_504(aiohttp_client: Any, start_upstream: Any) -> None:
    champion = await start_upstream(seed=1)
    config = make_config(champion.url, models={"champion": {"timeout_ms": 200}})
    slow, fast = await _both(aiohttp_client, config)
    champion.upstream.set_fault("hang")
    raw = _request(_json(_x(1)))
    answers = [_normal(await _exchange(p, raw)) for p in (slow, fast)]
    assert answers[0] == answers[1]
    assert answers[1][0] == b"HTTP/1.1 504 Gateway Timeout"
    assert "timed out after 200 ms" in json.loads(answers[1][2])["error"]
