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

from proxy.codec import DATATYPES
from tests.proxy.conftest import N_FEATURES, make_config


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
    assert got["meta"]["name"] == "classifier"
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
