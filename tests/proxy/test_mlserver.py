"""MLServer (the real one, from PyPI) as champion and candidate behind mirrorgate.

MLServer speaks V2 over JSON only (no binary tensor extension) and returns its default
output (``predict``) when a request names none. Through mirrorgate a client must get
exactly what MLServer answers, byte for byte, and the pair must hold both models'
outputs: before issue 11 every call here answered 502.

Needs MLServer's own virtual environment (tests/support/mlserver.py builds it once);
skipped when it cannot be built, except under ``MIRRORGATE_REQUIRE_SERVICES=1`` (CI),
where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from proxy.config import load_config
from tests.support.mlserver import MLServer, MLServerUnavailable, ensure_venv, write_model

REQUIRE = os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1"
MODEL = "digits"


class Pair:
    def __init__(self, champion: MLServer, candidate: MLServer) -> None:
        self.champion = champion
        self.candidate = candidate


@pytest.fixture(scope="module")
def mlservers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    try:
        venv = ensure_venv()
    except MLServerUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"MIRRORGATE_REQUIRE_SERVICES=1 but MLServer is unavailable: {exc}")
        pytest.skip(f"MLServer unavailable: {exc}")
    servers: list[MLServer] = []
    try:
        for kind in ("logreg", "mlp"):
            root = tmp_path_factory.mktemp(f"mlserver-{kind}")
            write_model(venv, root / MODEL, name=MODEL, version="v1", kind=kind)
            servers.append(MLServer(venv, root))
        for server in servers:
            server.wait_ready(MODEL)
        yield Pair(*servers)
    finally:
        for server in servers:
            server.stop()


def _digits(rows: int, offset: int = 1300) -> np.ndarray:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return (x[offset : offset + rows] / 16.0).astype(np.float32)


def _json_body(x: np.ndarray, rid: str, **extra: Any) -> bytes:
    doc = {
        "id": rid,
        "inputs": [
            {
                "name": "predict",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }
    return json.dumps(doc).encode()


def _config(pair: Pair, **extra: Any) -> Any:
    backend = {"kind": "http", "model": MODEL, "timeout_ms": 30_000}
    return load_config(
        data={
            "server": {"model_name": MODEL},
            "models": {
                "champion": {"name": "logreg", "url": pair.champion.url, **backend},
                "candidate": {"name": "mlp", "url": pair.candidate.url, **backend},
            },
            "mirror": {"timeout_ms": 30_000},
            **extra,
        },
        env={},
    )


async def _settled(proxy: Any, n: int) -> None:
    for _ in range(3000):
        if len(proxy.sink.records) >= n and proxy.state.mirror.in_flight == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(proxy.sink.records)} pairs recorded, expected {n}")


async def _direct(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, url + path, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, await resp.read()


async def test_json_infer_is_byte_for_byte_and_pairs_hold_both_models(
    mlservers: Pair, start_proxy: Any
) -> None:
    proxy = await start_proxy(_config(mlservers))
    # MLServer has no binary extension: the candidate is called in JSON.
    assert proxy.state.candidate.binary is False
    x = _digits(4)
    expected_labels: list[int] = []
    for i in range(3):
        body = _json_body(x[i : i + 2], f"mls-{i}")
        resp = await proxy.client.post(
            f"/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "application/json"}
        )
        through = await resp.read()
        status, direct = await _direct(
            mlservers.champion.url, "POST", f"/v2/models/{MODEL}/infer", body
        )
        assert resp.status == status == 200, through
        assert through == direct  # byte for byte: MLServer's own answer
        doc = json.loads(through)
        assert doc["model_version"] == "v1" and doc["outputs"][0]["name"] == "predict"
        expected_labels.extend(np.asarray(doc["outputs"][0]["data"]).ravel().tolist())
    await _settled(proxy, 6)
    records = sorted(proxy.sink.records, key=lambda r: r.id)
    assert [r.id for r in records] == [f"mls-{i}#{j}" for i in range(3) for j in range(2)]
    for record in records:
        # No output named: both sides were asked for their defaults and both returned
        # `predict` (no champion missing_output, no candidate 502).
        assert record.champion.error is None, record.champion.error
        assert record.candidate.error is None, record.candidate.error
    assert [int(r.champion.output[0]) for r in records] == expected_labels
    assert proxy.metric("mirrorgate_shadow_failures_total", reason="backend_error") == 0


async def test_every_v2_endpoint_is_mlservers_own(mlservers: Pair, start_proxy: Any) -> None:
    proxy = await start_proxy(_config(mlservers))
    for method, path, body in [
        ("GET", "/v2", None),
        ("GET", "/v2/models/digits", None),
        ("GET", "/v2/models/digits/versions/v1", None),
        ("GET", "/v2/models/digits/versions/v1/ready", None),
        ("GET", "/v2/models/digits/ready", None),
        ("GET", "/v2/health/live", None),
        ("GET", "/v2/models/nope", None),
        ("POST", "/v2/repository/index", b"{}"),
        ("POST", "/v2/models/digits/infer", b'{"inputs": "not a list"}'),
    ]:
        resp = await proxy.client.request(
            method, path, data=body, headers={"Content-Type": "application/json"}
        )
        got = await resp.read()
        status, direct = await _direct(mlservers.champion.url, method, path, body)
        assert (resp.status, got) == (status, direct), path
    meta = await (await proxy.client.get("/v2/models/digits")).json()
    assert meta["versions"] == [] or meta["versions"] == ["v1"]  # MLServer's, not "1"


def _triton_sync(url: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_model_ready(MODEL, "v1")
        inp = triton.InferInput("predict", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        out = triton.InferRequestedOutput("predict", binary_data=False)
        result = client.infer(MODEL, [inp], outputs=[out], request_compression_algorithm="gzip")
        return np.asarray(result.as_numpy("predict"))
    finally:
        client.close()


async def test_tritonclient_sync_gzip_and_aio_through_to_mlserver(
    mlservers: Pair, start_proxy: Any
) -> None:
    proxy = await start_proxy(_config(mlservers))
    server = proxy.client.server
    url = f"{server.host}:{server.port}"
    x = _digits(3, offset=1500)
    sync = await asyncio.to_thread(_triton_sync, url, x)
    direct = await asyncio.to_thread(
        _triton_sync, mlservers.champion.url.removeprefix("http://"), x
    )
    np.testing.assert_array_equal(sync, direct)
    # tritonclient.aio labels its JSON body application/octet-stream, which MLServer refuses (422,
    # gzipped): through mirrorgate the client gets exactly that refusal, not a 502.
    outcomes = []
    for target in (url, mlservers.champion.url.removeprefix("http://")):
        client = triton_aio.InferenceServerClient(url=target)
        try:
            inp = triton_aio.InferInput("predict", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=False)
            out = triton_aio.InferRequestedOutput("predict", binary_data=False)
            with pytest.raises(InferenceServerException) as caught:
                await client.infer(MODEL, [inp], outputs=[out])
            outcomes.append((caught.value.status(), caught.value.message()))
        finally:
            await client.close()
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == "422"
    await _settled(proxy, 3)
    assert all(r.candidate.error is None for r in proxy.sink.records)
