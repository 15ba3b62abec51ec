"""``tritonclient.http`` (a real, independent V2 client) against the proxy.

The sync client is gevent-based and blocking, so it runs in a worker thread while the
proxy and the upstreams serve on the test's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from proxy.protocol.codec import DATATYPES
from tests.proxy.conftest import LIVE_PATHS, N_FEATURES, make_config


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    """Every test here holds on both live paths (``server.live_path``)."""
    return str(request.param)


def _url(proxy: Any) -> str:
    server = proxy.client.server
    return f"{server.host}:{server.port}"


def _x(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(rows, N_FEATURES)).astype(np.float32)


def _sync_infer(url: str, x: np.ndarray, binary: bool, request_id: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("classifier")
        meta = client.get_model_metadata("classifier")
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = None
        if not binary:
            outputs = [
                triton.InferRequestedOutput(n, binary_data=False) for n in ("probs", "label")
            ]
        result = client.infer("classifier", [inp], outputs=outputs, request_id=request_id)
        return {
            "meta": meta,
            "probs": result.as_numpy("probs"),
            "label": result.as_numpy("label"),
            "id": result.get_response()["id"],
        }
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["defaults-binary", "json"])
async def test_sync_client_defaults_and_json(
    start_upstream: Any, start_proxy: Any, binary: bool
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    x = _x()
    got = await asyncio.to_thread(_sync_infer, _url(proxy), x, binary, "tc-1")
    expected = champion.model.predict(x)
    # A remote champion's metadata passes through: its own model name.
    assert got["meta"]["name"] == "model"
    assert got["id"] == "tc-1"
    np.testing.assert_allclose(got["probs"], expected["probs"], rtol=1e-6)
    np.testing.assert_array_equal(got["label"], expected["label"])


def _echo_array(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"a", b""], [b"\xff\x00bin", "ünï".encode()]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        return np.array([[1.5, -0.25], [np.inf, 3e3]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0], [1, info.max]], dtype=dtype)


@pytest.mark.parametrize("datatype", list(DATATYPES))
async def test_every_datatype_round_trips_through_the_proxy(
    start_upstream: Any, start_proxy: Any, datatype: str
) -> None:
    up = await start_upstream()
    # The float arrays carry Infinity, which JSON mode sends as a bare token: declared.
    config = make_config(
        up.url, models={"champion": {"model": "echo"}}, server={"nonfinite_inputs": ["*"]}
    )
    proxy = await start_proxy(config)
    array = _echo_array(datatype)
    client = triton_aio.InferenceServerClient(url=_url(proxy))
    try:
        for binary in (True, False):
            if not binary and datatype == "BYTES":
                array = np.array([[b"a"], ["ünï".encode()]], dtype=object)  # JSON: UTF-8 only
            inp = triton_aio.InferInput("t", list(array.shape), datatype)
            inp.set_data_from_numpy(array, binary_data=binary)
            out = triton_aio.InferRequestedOutput("t", binary_data=binary)
            result = await client.infer("classifier", [inp], outputs=[out])
            got = result.as_numpy("t")
            assert got.shape == array.shape
            if datatype == "BYTES":
                # tritonclient gives JSON BYTES back as str, binary BYTES as bytes.
                values = [g.encode() if isinstance(g, str) else g for g in got.ravel()]
                assert values == list(array.ravel())
            else:
                assert got.dtype == array.dtype
                np.testing.assert_array_equal(got, array)
    finally:
        await client.close()


def _simple_flow(url: str, x: np.ndarray) -> dict[str, Any]:
    """What tritonclient's `simple_http_*` examples do: health, metadata, infer, stats,
    and an unknown model whose error text they match."""
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("classifier") and client.is_model_ready("classifier", "1")
        assert "statistics" in client.get_server_metadata()["extensions"]
        index = client.get_model_repository_index()
        for compression in (None, "gzip", "deflate"):
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer("classifier", [inp], request_compression_algorithm=compression)
        stats = client.get_inference_statistics("classifier")
        version_stats = client.get_inference_statistics("classifier", "1")
        try:
            client.get_model_metadata("nope")
            unknown = ""
        except triton.InferenceServerException as exc:
            unknown = exc.message()
        return {"stats": stats, "version_stats": version_stats, "unknown": unknown, "index": index}
    finally:
        client.close()


async def test_in_process_model_serves_tritons_statistics_and_wording(
    start_upstream: Any, start_proxy: Any
) -> None:
    from tests.proxy.conftest import NumpyBackend
    from tests.proxy.upstream import UpstreamModel

    candidate = await start_upstream(seed=2)
    champion = NumpyBackend(UpstreamModel(N_FEATURES, 3, 1))
    proxy = await start_proxy(make_config(candidate.url, candidate.url), champion=champion)
    got = await asyncio.to_thread(_simple_flow, _url(proxy), _x(2))
    (model,) = got["stats"]["model_stats"]
    assert model["name"] == "classifier" and model["version"] == "1"
    infer_stats = model["inference_stats"]
    # Three requests of two rows, all answered: counts are exact, durations real.
    assert infer_stats["success"]["count"] == 3 and infer_stats["fail"]["count"] == 0
    assert model["execution_count"] == 3 and model["inference_count"] == 6
    assert champion.calls == 3
    for phase in ("success", "compute_infer"):
        assert infer_stats[phase]["ns"] > 0
    assert infer_stats["success"]["ns"] >= infer_stats["compute_infer"]["ns"]
    assert model["last_inference"] > 0
    assert got["version_stats"]["model_stats"][0]["version"] == "1"
    assert got["unknown"] == "Request for unknown model: 'nope' is not found"
    assert got["index"] == [{"name": "classifier", "version": "1", "state": "READY"}]


async def test_remote_champion_endpoints_and_compression_are_the_upstreams(
    start_upstream: Any, start_proxy: Any
) -> None:
    """tritonclient (sync and aio, binary and JSON, gzip/deflate requests) through the
    proxy gets byte-identical answers to the upstream's."""
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    x = _x(3)

    async def run(url: str) -> list[bytes]:
        client = triton_aio.InferenceServerClient(url=url)
        out: list[bytes] = []
        try:
            for binary in (True, False):
                for compression in (None, "gzip", "deflate"):
                    inp = triton_aio.InferInput("x", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=binary)
                    req = triton_aio.InferRequestedOutput("probs", binary_data=binary)
                    result = await client.infer(
                        "model",
                        [inp],
                        outputs=[req],
                        request_id="same",
                        request_compression_algorithm=compression,
                    )
                    out.append(result.as_numpy("probs").tobytes())
        finally:
            await client.close()
        return out

    direct = await run(champion.url.removeprefix("http://"))
    # Through the proxy, named as the upstream names its model (served name differs:
    # only `classifier` is mirrored; other names pass straight through).
    through = await run(_url(proxy))
    assert through == direct


def _without_mtime(coding: str, raw: bytes) -> bytes:
    # tritonclient's gzip header carries the time of compression (RFC 1952 MTIME, bytes
    # 4-7): the only bytes two compressions of one body may differ in.
    return raw[:4] + b"\0\0\0\0" + raw[8:] if coding == "gzip" else raw


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_tritonclient_compressed_requests_reach_the_champion_as_sent(
    start_upstream: Any, start_proxy: Any, binary: bool
) -> None:
    """tritonclient's gzip/deflate request compression in front of a remote champion:
    the champion receives the compressed bytes tritonclient sends (the same bytes it
    receives from tritonclient directly) with their Content-Encoding, and every pair is
    recorded from the decoded tensors."""
    champion = await start_upstream(seed=1, raw_bodies=True)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url, storage={"capture": "all"}))
    x = _x(2)
    codings = ("gzip", "deflate")

    async def run(url: str, model: str) -> list[bytes]:
        client = triton_aio.InferenceServerClient(url=url)
        out = []
        try:
            for coding in codings:
                inp = triton_aio.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                result = await client.infer(
                    model, [inp], request_id=f"tc-{coding}", request_compression_algorithm=coding
                )
                out.append(result.as_numpy("probs").tobytes())
        finally:
            await client.close()
        return out

    direct = await run(champion.url.removeprefix("http://"), "model")
    through = await run(_url(proxy), "classifier")
    assert through == direct
    received = list(champion.upstream.received)
    assert len(received) == 2 * len(codings)
    for i, coding in enumerate(codings):
        (direct_headers, direct_raw), (headers, raw) = received[i], received[len(codings) + i]
        assert headers["Content-Encoding"] == direct_headers["Content-Encoding"] == coding
        assert _without_mtime(coding, raw) == _without_mtime(coding, direct_raw)
    for _ in range(3000):
        if len(proxy.sink.records) >= 2 * len(codings) and proxy.state.mirror.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    records = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == [f"tc-{c}#{i}" for c in sorted(codings) for i in range(2)]
    expected = champion.model.predict(x)["probs"]
    for record in records:
        row = int(record.id.rsplit("#", 1)[1])
        assert record.candidate.error is None and record.inputs is not None
        np.testing.assert_array_equal(record.inputs["x"], x[row])
        np.testing.assert_allclose(record.champion.output, expected[row], rtol=1e-6)
