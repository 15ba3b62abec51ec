"""The worker's raw candidate client: the same answers and failures as HttpBackend.

Real upstreams on loopback: the V2 test server (tests/proxy/upstream.py) for answers and
faults, side by side with the aiohttp ``HttpBackend`` it stands in for; and small raw
asyncio servers for what an aiohttp server will not do on demand (close a kept-alive
connection when the next request arrives, chunked and connection-framed bodies).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from proxy.backends.http import HttpBackend
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BackendTimeout
from proxy.shadow.candidate_client import CandidateClient, RawCandidate
from tests.proxy.conftest import N_CLASSES, N_FEATURES


def _settings(url: str, **kw: Any) -> BackendSettings:
    return BackendSettings(
        **{"name": "up", "kind": "http", "url": url, "model": "model", "timeout_ms": 5000, **kw}
    )


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


async def _pair(url: str, **kw: Any) -> tuple[HttpBackend, RawCandidate]:
    plain = await HttpBackend.create(_settings(url, **kw))
    return plain, RawCandidate(await HttpBackend.create(_settings(url, **kw)))


@pytest.mark.parametrize("binary", ["always", "never"])
async def test_answers_equal_the_aiohttp_backends(start_upstream: Any, binary: str) -> None:
    up = await start_upstream(seed=3)
    plain, raw = await _pair(up.url, upstream={"binary": binary})
    try:
        assert raw.metadata == plain.metadata and raw.identity == plain.identity
        for seed in range(5):  # several calls: the kept-alive connection is reused
            x = _x(seed + 1, seed)
            want, got = await plain.infer({"x": x}), await raw.infer({"x": x})
            assert list(got) == list(want)
            for name in want:
                assert got[name].dtype == want[name].dtype
                np.testing.assert_array_equal(got[name], want[name])
        only = await raw.infer({"x": _x()}, outputs=["label"])
        assert list(only) == ["label"]
        assert len(raw.client._idle) == 1  # one connection served every sequential call
    finally:
        await plain.aclose()
        await raw.aclose()


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        ({"mode": "error", "status": 500, "message": "CUDA out of memory"}, 502, "CUDA out"),
        ({"mode": "error", "status": 400, "message": "bad input shape"}, 400, "bad input shape"),
        ({"mode": "non_json"}, 502, "not valid JSON"),
        ({"mode": "garbage"}, 502, "shape [7, 7, 7] of FP32 needs 1372 bytes"),
        ({"mode": "crash"}, 502, "mid-response"),
    ],
    ids=["500", "400", "non-json", "garbage-shape", "crash-mid-response"],
)
async def test_upstream_faults_are_the_same_errors(
    start_upstream: Any, fault: dict[str, Any], status: int, message: str
) -> None:
    up = await start_upstream(**fault)
    plain, raw = await _pair(up.url)
    try:
        with pytest.raises(BackendError) as theirs:
            await plain.infer({"x": _x()})
        before = up.upstream.stats.started
        with pytest.raises(BackendError) as mine:
            await raw.infer({"x": _x()})
        assert type(mine.value) is type(theirs.value)
        assert mine.value.status == theirs.value.status == status
        assert message in mine.value.message
        assert up.upstream.stats.started == before + 1  # a failure after the request: no retry
        up.upstream.set_fault("normal")  # the pool survives a fault
        assert (await raw.infer({"x": _x()}))["probs"].shape == (3, N_CLASSES)
    finally:
        await plain.aclose()
        await raw.aclose()


async def test_a_deadline_is_backend_timeout_and_the_connection_is_dropped(
    start_upstream: Any,
) -> None:
    up = await start_upstream(mode="hang")
    raw = RawCandidate(await HttpBackend.create(_settings(up.url, timeout_ms=200)))
    try:
        with pytest.raises(BackendTimeout) as err:
            await raw.infer({"x": _x()})
        assert err.value.status == 504 and "timed out after 200 ms" in err.value.message
        assert raw.client._idle == []  # never reused mid-response
    finally:
        await raw.aclose()


async def test_an_unreachable_upstream_is_a_backend_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = CandidateClient(f"http://127.0.0.1:{port}")
    with pytest.raises(BackendError, match="connection failed"):
        await client.post("/v2/models/m/infer", [], b"{}", 5.0)


# ------------------------------------------------------------------ raw servers

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """Counts connections and requests; ``respond(conn_index, request_index)`` returns
    the bytes to answer with, or None to close the connection without a byte."""

    def __init__(self, respond: Callable[[int, int], bytes | None]) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                answer = self.respond(conn, n)
                n += 1
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def start(respond: Callable[[int, int], bytes | None]) -> tuple[RawServer, str]:
        raw = RawServer(respond)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        return raw, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_kept_alive_connection_closed_by_the_upstream_is_retried_once_fresh(
    raw_server: Callable[..., Any],
) -> None:
    # each connection answers its first request only; the second arrives on a
    # connection the upstream then closes without a byte (its idle timeout, a restart)
    raw, url = await raw_server(lambda conn, n: OK if n == 0 else None)
    client = CandidateClient(url)
    try:
        first = await client.post("/p", [("X-Request-Id", "a")], b"1", 5.0)
        second = await client.post("/p", [("X-Request-Id", "b")], b"2", 5.0)
        assert (first.status, first.body, second.status, second.body) == (200, b"ok", 200, b"ok")
        assert first.reason == "OK" and ("Content-Type", "text/plain") in first.headers
        # the second request reached the upstream twice: on the stale and the fresh one
        assert raw.connections == 2 and len(raw.requests) == 3
        assert raw.requests[0].startswith(b"POST /p HTTP/1.1\r\n")
        assert b"\r\nX-Request-Id: b\r\n" in raw.requests[2] and raw.requests[2].endswith(b"2")
    finally:
        client.close()


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(
    raw_server: Callable[..., Any],
) -> None:
    raw, url = await raw_server(lambda conn, n: None)
    client = CandidateClient(url)
    with pytest.raises(BackendError, match="without answering"):
        await client.post("/p", [], b"x", 5.0)
    assert raw.connections == 1 and len(raw.requests) == 1


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
            True,
        ),
        # no length, no chunking: the body runs to the end of the connection
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end", b"to the end", False),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy", b"busy", True),
    ],
    ids=["chunked", "connection-framed", "error-status"],
)
async def test_bodies_are_read_by_their_framing(
    raw_server: Callable[..., Any], answer: bytes, body: bytes, reused: bool
) -> None:
    raw, url = await raw_server(lambda conn, n: answer)
    client = CandidateClient(url)
    try:
        for _ in range(2):
            reply = await client.post("/p", [], b"", 5.0)
            assert reply.body == body
        assert raw.connections == (1 if reused else 2)
        # hop-by-hop headers are not part of the reply, as with HttpBackend
        assert all(k.lower() not in ("connection", "transfer-encoding") for k, _ in reply.headers)
    finally:
        client.close()


async def test_a_header_that_would_split_the_request_is_refused() -> None:
    client = CandidateClient("http://127.0.0.1:9")
    with pytest.raises(BackendError) as err:
        await client.post("/p", [("X-Evil", "a\r\nX-Injected: 1")], b"", 5.0)
    assert err.value.status == 400


async def test_tls_with_the_backends_ca_and_client_certificate(tmp_path: Any) -> None:
    import ssl

    from aiohttp import web

    from tests.proxy.dataplane.test_passthrough import _make_pki
    from tests.proxy.upstream import Upstream, UpstreamModel

    _make_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED  # mTLS: no client certificate, no service
    upstream = Upstream(UpstreamModel(N_FEATURES, 3, 1))
    runner = web.AppRunner(upstream.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    mtls = {
        "ca_file": str(tmp_path / "ca.pem"),
        "cert_file": str(tmp_path / "client.pem"),
        "key_file": str(tmp_path / "client.key"),
    }
    try:
        raw = RawCandidate(
            await HttpBackend.create(_settings(f"https://127.0.0.1:{port}", upstream=mtls))
        )
        try:
            for seed in range(2):
                out = await raw.infer({"x": _x(1, seed)})
                want = upstream.model.predict(_x(1, seed))["probs"]
                np.testing.assert_allclose(out["probs"], want)
            assert len(raw.client._idle) == 1  # kept alive over TLS too
        finally:
            await raw.aclose()
        # the same client without its certificate is refused by the upstream
        no_cert = CandidateClient(
            f"https://127.0.0.1:{port}",
            tls=ssl.create_default_context(cafile=str(tmp_path / "ca.pem")),
        )
        with pytest.raises(BackendError):
            await no_cert.post("/v2/models/model/infer", [], b"{}", 5.0)
        no_cert.close()
    finally:
        await runner.cleanup()


async def test_a_url_with_credentials_stays_on_aiohttp(start_upstream: Any) -> None:
    # aiohttp sends a URL's user:password as basic auth; the raw pool would not
    from proxy.shadow.candidate_client import supports

    up = await start_upstream()
    plain = await HttpBackend.create(_settings(up.url))
    with_auth = await HttpBackend.create(_settings(up.url.replace("://", "://u:p@")))
    try:
        assert supports(plain) and not supports(with_auth)
    finally:
        await plain.aclose()
        await with_auth.aclose()
