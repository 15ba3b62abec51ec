"""A remote champion's answers pass through; requests to each upstream use an encoding
it accepts; stale pooled connections are retried once; TLS with a CA and mTLS."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import ssl
import subprocess
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from proxy.backends.http import HttpBackend
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError
from proxy.core.ratelog import FailureLog
from proxy.protocol.base import ModelMetadata
from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request
from tests.proxy.conftest import LIVE_PATHS, N_FEATURES, make_config

INFER = "/v2/models/classifier/infer"


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    """Every test here holds on both live paths (``server.live_path``)."""
    return str(request.param)


SESSION = web.AppKey("session", aiohttp.ClientSession)


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


def _json(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    data = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return {"inputs": [data], **extra}


async def _settled(proxy: Any, n: int) -> None:
    for _ in range(3000):
        if len(proxy.sink.records) >= n and proxy.state.mirror.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(proxy.sink.records)} pairs, expected {n}")


async def test_champion_answer_and_headers_pass_through_candidate_gets_tracing_only(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    headers = {
        "Authorization": "Bearer prod-secret",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "X-Tenant": "acme",
    }
    body = json.dumps(_json(_x(1), id="p-1")).encode()
    resp = await proxy.client.post(INFER, data=body, headers=headers)
    got = await resp.read()
    # Byte for byte what the champion answers to the same request.
    direct = await proxy.client.session.post(f"{champion.url}/v2/models/model/infer", data=body)
    assert resp.status == 200 and got == await direct.read()
    assert json.loads(got)["model_name"] == "model"  # the upstream's, not rewritten
    await _settled(proxy, 1)
    champ_headers = champion.upstream.seen[0][0]
    assert champ_headers["Authorization"] == "Bearer prod-secret"
    assert champ_headers["X-Tenant"] == "acme"
    cand_headers = candidate.upstream.seen[0][0]
    assert cand_headers["traceparent"] == headers["traceparent"]
    assert "Authorization" not in cand_headers and "X-Tenant" not in cand_headers
    (record,) = proxy.sink.records
    assert record.id == "p-1" and record.candidate.error is None
    np.testing.assert_allclose(
        record.champion.output, champion.model.predict(_x(1))["probs"][0], rtol=1e-6
    )


async def test_champion_errors_pass_through_as_written(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    resp = await proxy.client.post(INFER, data=b'{"inputs": [{"name": "x"}]}')
    direct = await proxy.client.session.post(
        f"{champion.url}/v2/models/model/infer", data=b'{"inputs": [{"name": "x"}]}'
    )
    assert (resp.status, await resp.read()) == (direct.status, await direct.read())
    assert resp.status == 400
    await asyncio.sleep(0)
    assert candidate.upstream.stats.started == 0 and not proxy.sink.records


async def test_outputs_candidate_is_asked_only_what_the_champion_was(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    assert (await proxy.client.post(INFER, json=_json(_x(1), id="none"))).status == 200
    named = _json(_x(1), id="label", outputs=[{"name": "label"}])
    assert (await proxy.client.post(INFER, json=named)).status == 200
    await _settled(proxy, 2)
    asked = {tuple(c[1]) if c[1] else None for c in candidate.upstream.seen}
    assert asked == {None, ("label",)}
    records = {r.id: r for r in proxy.sink.records}
    # Named `label`: the pair compares label (what both sides returned).
    expected = champion.model.predict(_x(1))
    assert records["label"].champion.output.tolist() == [float(expected["label"][0])]
    assert records["none"].candidate.error is None


async def test_json_only_upstream_gets_json(start_upstream: Any, start_proxy: Any) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    candidate.upstream.binary_extension = False  # like MLServer
    binary_client = await start_upstream(seed=3)  # a binary-capable one for comparison
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    assert proxy.state.candidate.binary is False
    body, hl = encode_infer_request({"x": _x(2)}, request_id="b-1")
    resp = await proxy.client.post(INFER, data=body, headers={HEADER_LENGTH: str(hl)})
    assert resp.status == 200
    await _settled(proxy, 2)
    _, _, binary = candidate.upstream.seen[0]
    assert binary is False  # rebuilt as JSON, no binary extension
    assert champion.upstream.seen[0][2] is True  # the client's binary request, as sent
    settings = BackendSettings(
        name="b", kind="http", url=binary_client.url, model="model", upstream={"binary": "never"}
    )
    forced = await HttpBackend.create(settings)
    try:
        assert forced.binary is False
        out = await forced.infer({"x": _x(1)})
        np.testing.assert_allclose(out["probs"], binary_client.model.predict(_x(1))["probs"])
    finally:
        await forced.aclose()


async def test_compressed_answer_passes_through_compressed(
    aiohttp_server: Any, start_upstream: Any, start_proxy: Any
) -> None:
    """An upstream that gzips its answer when asked: the client gets the gzip bytes and
    the upstream's own headers; the pair is still decoded (off the live path)."""
    real = await start_upstream(seed=1)

    async def relay(request: web.Request) -> web.Response:
        async with request.app[SESSION].request(
            request.method,
            real.url + request.path_qs,
            data=await request.read(),
            headers={
                k: v for k, v in request.headers.items() if k.lower() == HEADER_LENGTH.lower()
            },
        ) as up:
            payload = await up.read()
            headers = {k: v for k, v in up.headers.items() if k.lower() == HEADER_LENGTH.lower()}
        headers["X-Upstream"] = "gz"
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            payload = gzip.compress(payload, mtime=0)
        return web.Response(status=up.status, body=payload, headers=headers)

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    server = await aiohttp_server(app)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(str(server.make_url("")).rstrip("/"), candidate.url))
    body = json.dumps(_json(_x(1), id="gz-1")).encode()
    # A session that leaves bodies compressed, to see the bytes the proxy sent.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        resp = await session.post(
            str(proxy.client.make_url(INFER)), data=body, headers={"Accept-Encoding": "gzip"}
        )
        raw = await resp.read()
    assert resp.headers["Content-Encoding"] == "gzip" and resp.headers["X-Upstream"] == "gz"
    assert json.loads(gzip.decompress(raw))["id"] == "gz-1"
    await _settled(proxy, 1)
    (record,) = proxy.sink.records
    assert record.champion.error is None and record.candidate.error is None


def _deflate_raw(raw: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(raw) + packer.flush()


CODINGS = {
    "gzip": lambda raw: gzip.compress(raw, mtime=0),
    "deflate": zlib.compress,  # RFC 1950, as the standard says
    "deflate-raw": _deflate_raw,  # RFC 1951, as many clients send it under "deflate"
}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("coding", list(CODINGS))
async def test_compressed_request_reaches_the_champion_as_sent_and_is_paired(
    start_upstream: Any, start_proxy: Any, coding: str, binary: bool
) -> None:
    """Issue 11 item 1: the champion gets the client's compressed bytes and its
    Content-Encoding unchanged; mirrorgate decodes them only for the pair."""
    champion = await start_upstream(seed=1, raw_bodies=True)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url, storage={"capture": "all"}))
    x = _x(3, seed=5)
    rid = f"{coding}-{binary}"
    if binary:
        plain, hl = encode_infer_request({"x": x}, request_id=rid, binary=True)
        headers = {HEADER_LENGTH: str(hl)}
    else:
        plain, headers = json.dumps(_json(x, id=rid)).encode(), {}
    sent = CODINGS[coding](plain)
    headers["Content-Encoding"] = coding.removesuffix("-raw")
    resp = await proxy.client.post(INFER, data=sent, headers=headers)
    got = await resp.read()
    assert resp.status == 200, got
    (received_headers, received) = champion.upstream.received[-1]
    assert received == sent  # byte for byte: not decompressed, not re-encoded
    assert received_headers["Content-Encoding"] == headers["Content-Encoding"]
    assert int(received_headers["Content-Length"]) == len(sent)
    # What the champion answers the same bytes directly.
    direct = await proxy.client.session.post(
        f"{champion.url}/v2/models/model/infer", data=sent, headers=headers
    )
    assert got == await direct.read()
    assert resp.headers["X-Request-Id"] == rid  # the id read from the compressed body
    await _settled(proxy, 3)
    records = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == [f"{rid}#{i}" for i in range(3)]
    expected = champion.model.predict(x)["probs"]
    for i, record in enumerate(records):
        assert record.champion.error is None and record.candidate.error is None
        assert record.inputs is not None
        np.testing.assert_array_equal(record.inputs["x"], x[i])
        np.testing.assert_allclose(record.champion.output, expected[i], rtol=1e-6)
    assert proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable") == 0


async def test_unknown_coding_gets_the_champions_own_answer_and_drops_the_pair(
    start_upstream: Any, start_proxy: Any
) -> None:
    """Pass-through: a coding mirrorgate cannot read is the champion's to judge (a strict
    server's 415 here; the lenient test upstream's 200 below); a pair that cannot be
    decoded is counted as an undecodable drop, never half written."""
    strict = await start_upstream(seed=1, raw_bodies=True)
    lenient = await start_upstream(seed=1)  # aiohttp ignores a coding it does not know
    candidate = await start_upstream(seed=2)
    body = json.dumps(_json(_x(1), id="bogus")).encode()
    headers = {"Content-Encoding": "x-bogus"}
    for champion, status in ((strict, 415), (lenient, 200)):
        proxy = await start_proxy(make_config(champion.url, candidate.url))
        resp = await proxy.client.post(INFER, data=body, headers=headers)
        direct = await proxy.client.session.post(
            f"{champion.url}/v2/models/model/infer", data=body, headers=headers
        )
        assert (resp.status, await resp.read()) == (status, await direct.read())
        dropped = 1 if status == 200 else 0  # only an answered request has a pair
        for _ in range(3000):
            if proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable") >= dropped:
                break
            await asyncio.sleep(0.01)
        assert proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable") == dropped
        assert not proxy.sink.records
    assert candidate.upstream.stats.started == 0


async def test_decompression_bomb_is_the_champions_and_drops_the_pair(
    start_upstream: Any, start_proxy: Any
) -> None:
    """A gzip body that decodes past server.max_body_bytes: forwarded as sent (the
    champion's limits apply to it); mirrorgate never decodes more than the limit, and
    the pair is an undecodable drop."""
    champion = await start_upstream(seed=1, raw_bodies=True)
    candidate = await start_upstream(seed=2)
    limit = 1 << 20
    proxy = await start_proxy(
        make_config(champion.url, candidate.url, server={"max_body_bytes": limit})
    )
    plain = json.dumps(_json(_x(1), id="bomb")).encode()
    plain = plain[:-1] + b" " * (8 * limit) + b"}"  # valid JSON, 8x the limit
    sent = gzip.compress(plain, mtime=0)
    assert len(sent) < limit // 16
    resp = await proxy.client.post(INFER, data=sent, headers={"Content-Encoding": "gzip"})
    assert resp.status == 200, await resp.read()
    assert champion.upstream.received[-1][1] == sent
    for _ in range(3000):
        if proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable") >= 1:
            break
        await asyncio.sleep(0.01)
    assert proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable") == 1
    assert not proxy.sink.records and candidate.upstream.stats.started == 0


# --------------------------------------------------------------------------- canary


def _canary(champion: Any, candidate: Any, **sections: Any) -> Any:
    return make_config(
        champion.url,
        candidate.url,
        mirror={"mode": "canary", "canary_weight": 1.0},
        storage={"capture": "all"},
        **sections,
    )


async def test_canary_request_passes_through_to_a_remote_candidate(
    start_upstream: Any, start_proxy: Any
) -> None:
    """A canary request routed to a remote candidate gets the candidate's own answer
    (status, headers, body bytes), its body forwarded as sent (gzip included); the
    champion is called for the pair."""
    champion = await start_upstream(seed=1, raw_bodies=True)
    candidate = await start_upstream(seed=2, raw_bodies=True)
    proxy = await start_proxy(_canary(champion, candidate))
    x = _x(2, seed=9)
    sent = gzip.compress(json.dumps(_json(x, id="can-1")).encode(), mtime=0)
    headers = {
        "Content-Encoding": "gzip",
        "Authorization": "Bearer prod-secret",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    resp = await proxy.client.post(INFER, data=sent, headers=headers)
    got = await resp.read()
    assert resp.status == 200 and resp.headers["X-Mirrorgate-Served-By"] == "candidate"
    direct = await proxy.client.session.post(
        f"{candidate.url}/v2/models/model/infer",
        data=sent,
        headers={"Content-Encoding": "gzip"},
    )
    assert got == await direct.read()  # the candidate's bytes, not re-encoded
    assert resp.headers["Content-Type"] == direct.headers["Content-Type"]
    cand_headers, cand_raw = candidate.upstream.received[0]
    assert cand_raw == sent and cand_headers["Content-Encoding"] == "gzip"
    # The candidate's header policy holds on the canary path too: tracing only.
    assert cand_headers["traceparent"] == headers["traceparent"]
    assert "Authorization" not in cand_headers
    await _settled(proxy, 2)
    # The champion was called for the pair, rebuilt from the decoded tensors.
    assert len(champion.upstream.received) == 1
    assert champion.upstream.received[0][0]["Authorization"] == "Bearer prod-secret"
    records = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == ["can-1#0", "can-1#1"]
    for i, record in enumerate(records):
        assert record.served_by == "candidate" and record.champion.error is None
        assert record.inputs is not None
        np.testing.assert_array_equal(record.inputs["x"], x[i])
        np.testing.assert_allclose(
            record.candidate.output, candidate.model.predict(x)["probs"][i], rtol=1e-6
        )
        np.testing.assert_allclose(
            record.champion.output, champion.model.predict(x)["probs"][i], rtol=1e-6
        )
    assert proxy.metric("mirrorgate_proxy_requests_total", role="candidate", code="200") == 1


async def test_canary_candidate_failure_is_answered_by_the_champion_as_it_wrote_it(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2, mode="error", status=500, message="boom")
    proxy = await start_proxy(_canary(champion, candidate))
    body = json.dumps(_json(_x(1), id="can-2")).encode()
    resp = await proxy.client.post(INFER, data=body)
    direct = await proxy.client.session.post(f"{champion.url}/v2/models/model/infer", data=body)
    assert (resp.status, await resp.read()) == (200, await direct.read())
    assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
    await _settled(proxy, 1)
    (record,) = proxy.sink.records
    assert record.served_by == "champion" and record.champion.error is None
    assert record.candidate.error is not None and record.candidate.error.startswith(
        "backend_error: upstream 'model' answered 500"
    )
    assert proxy.metric("mirrorgate_shadow_failures_total", reason="backend_error") == 1
    assert proxy.metric("mirrorgate_proxy_requests_total", role="candidate", code="502") == 1


async def test_canary_binary_request_to_a_json_only_candidate_is_rebuilt(
    start_upstream: Any, start_proxy: Any
) -> None:
    """A candidate that cannot read the client's binary tensors gets the request
    rebuilt in JSON (docs/proxy.md, "Encoding per upstream"): it still answers."""
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    candidate.upstream.binary_extension = False
    proxy = await start_proxy(_canary(champion, candidate))
    body, hl = encode_infer_request({"x": _x(1)}, request_id="can-3")
    resp = await proxy.client.post(INFER, data=body, headers={HEADER_LENGTH: str(hl)})
    assert resp.status == 200 and resp.headers["X-Mirrorgate-Served-By"] == "candidate"
    assert candidate.upstream.seen[0][2] is False  # JSON, rebuilt
    await _settled(proxy, 1)


# --------------------------------------------------------------------------- connections


async def _stale_server() -> tuple[asyncio.Server, int, list[int]]:
    """Answers the first request on each connection with keep-alive, then closes the
    connection when a second request arrives on it, before any response byte: what an
    upstream that dropped an idle keep-alive connection looks like to a client."""
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
                if per_connection[me] > 1:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 11\r\n\r\n{"ok":true}'
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], per_connection


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    server, port, per_connection = await _stale_server()
    settings = BackendSettings(name="s", kind="http", url=f"http://127.0.0.1:{port}", model="m")
    meta = ModelMetadata(name="m", platform="", inputs=(), outputs=())
    backend = HttpBackend(settings, HttpBackend._new_session(settings), meta)
    try:
        first = await backend.forward("POST", "/v2/models/m/infer", b"{}", ())
        second = await backend.forward("POST", "/v2/models/m/infer", b"{}", ())
        assert first.status == second.status == 200 and second.body == b'{"ok":true}'
        # The second request met the closed connection, then went out on a new one.
        assert per_connection[0] == 2 and len(per_connection) == 2
    finally:
        await backend.aclose()
        server.close()


def test_failure_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    flog = FailureLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        assert flog.failure("http://u", 502, "reset")
        assert not flog.failure("http://u", 502, "reset")
        assert flog.failure("http://u", 500, "boom")  # another status: its own line
        now[0] = 11.0
        assert flog.failure("http://u", 502, "reset")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "1 more like it" in lines[2] and "http://u" in lines[0]


async def test_champion_connection_failure_is_logged(
    start_upstream: Any, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    champion = await start_upstream(seed=1)
    proxy = await start_proxy(make_config(champion.url))
    champion.upstream.set_fault("crash")
    with caplog.at_level(logging.WARNING, logger="proxy.dataplane.passthrough"):
        resp = await proxy.client.post(INFER, json=_json(_x(1)))
    assert resp.status == 502 and "error" in await resp.json()
    assert any(champion.url in r.getMessage() and "502" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        extra = ["-extfile", "san.ext"] if name == "server" else []
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            *extra,
            cwd=d,
        )


async def test_tls_upstream_with_ca_and_client_certificate(tmp_path: Path) -> None:
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
    url = f"https://127.0.0.1:{port}"
    tls = {"ca_file": str(tmp_path / "ca.pem")}
    try:
        mtls = {
            **tls,
            "cert_file": str(tmp_path / "client.pem"),
            "key_file": str(tmp_path / "client.key"),
        }
        settings = BackendSettings(name="t", kind="http", url=url, model="model", upstream=mtls)
        backend = await HttpBackend.create(settings)
        try:
            out = await backend.infer({"x": _x(1)})
            np.testing.assert_allclose(out["probs"], upstream.model.predict(_x(1))["probs"])
        finally:
            await backend.aclose()
        no_cert = BackendSettings(name="t", kind="http", url=url, model="model", upstream=tls)
        with pytest.raises(BackendError):
            await HttpBackend.create(no_cert)
        no_ca = BackendSettings(name="t", kind="http", url=url, model="model")
        with pytest.raises(BackendError):
            await HttpBackend.create(no_ca)
    finally:
        await runner.cleanup()


async def test_forward_headers_configures_what_the_candidate_gets(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        models={"candidate": {"upstream": {"forward_headers": ["X-Tenant"]}}},
    )
    proxy = await start_proxy(config)
    headers = {"Authorization": "Bearer prod", "X-Tenant": "acme", "traceparent": "00-a-b-01"}
    resp = await proxy.client.post(INFER, json=_json(_x(1), id="h"), headers=headers)
    assert resp.status == 200
    await _settled(proxy, 1)
    sent = candidate.upstream.seen[0][0]
    assert sent["X-Tenant"] == "acme"
    assert "Authorization" not in sent and "traceparent" not in sent
    assert sent["Content-Type"] == "application/octet-stream"  # rebuilt, binary upstream
