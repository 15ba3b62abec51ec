"""HttpBackend against a real V2 upstream server on loopback, including its faults."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from proxy.backends.factory import create_backend
from proxy.backends.http import HttpBackend
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BackendTimeout
from proxy.protocol.base import Backend
from tests.proxy.conftest import N_CLASSES, N_FEATURES


def _settings(url: str, **kw: Any) -> BackendSettings:
    return BackendSettings(
        **{"name": "up", "kind": "http", "url": url, "model": "model", "timeout_ms": 2000, **kw}
    )


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


async def test_metadata_and_outputs_match_the_numpy_oracle(start_upstream: Any) -> None:
    up = await start_upstream(seed=3)
    backend = await create_backend(_settings(up.url))
    try:
        assert isinstance(backend, HttpBackend) and isinstance(backend, Backend)
        meta = backend.metadata
        assert [s.name for s in meta.inputs] == ["x"]
        assert meta.inputs[0].shape == (-1, N_FEATURES)
        assert [s.name for s in meta.outputs] == ["probs", "label"]
        assert backend.identity.kind == "http" and len(backend.identity.digest) == 64
        x = _x()
        out = await backend.infer({"x": x})
        expected = up.model.predict(x)
        np.testing.assert_allclose(out["probs"], expected["probs"], rtol=1e-6)
        np.testing.assert_array_equal(out["label"], expected["label"])
        only = await backend.infer({"x": x}, outputs=["label"])
        assert list(only) == ["label"]
    finally:
        await backend.aclose()


async def test_one_pooled_session_serves_concurrent_calls(start_upstream: Any) -> None:
    up = await start_upstream()
    backend = await HttpBackend.create(_settings(up.url))
    try:
        up.upstream.set_fault("hold")
        calls = [asyncio.ensure_future(backend.infer({"x": _x(1, i)})) for i in range(8)]
        await asyncio.wait_for(up.upstream.wait_for(started=8), 30)
        assert up.upstream.stats.max_in_flight == 8
        up.upstream.release()
        results = await asyncio.gather(*calls)
        assert len(results) == 8
        assert backend._session.connector is not None
        assert len(backend._session.connector._conns) >= 1  # keep-alive connections pooled
    finally:
        await backend.aclose()
    assert backend._session.closed


async def test_timeout_is_backend_timeout(start_upstream: Any) -> None:
    up = await start_upstream(mode="hang")
    backend = await HttpBackend.create(_settings(up.url, timeout_ms=100))
    try:
        with pytest.raises(BackendTimeout) as err:
            await backend.infer({"x": _x()})
        assert err.value.status == 504
        assert "timed out after 100 ms" in err.value.message
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (
            {"mode": "error", "status": 500, "message": "CUDA out of memory"},
            502,
            "CUDA out of memory",
        ),
        ({"mode": "error", "status": 400, "message": "bad input shape"}, 400, "bad input shape"),
        ({"mode": "non_json"}, 502, "not valid JSON"),
        ({"mode": "garbage"}, 502, "shape [7, 7, 7] of FP32 needs 1372 bytes"),
        ({"mode": "crash"}, 502, "connection failed"),
    ],
    ids=["500", "400", "non-json", "garbage-shape", "crash-mid-response"],
)
async def test_upstream_faults_are_backend_errors(
    start_upstream: Any, fault: dict[str, Any], status: int, message: str
) -> None:
    up = await start_upstream(**fault)
    backend = await HttpBackend.create(_settings(up.url))
    try:
        with pytest.raises(BackendError) as err:
            await backend.infer({"x": _x()})
        assert err.value.status == status
        assert message in err.value.message
        # The pooled session survives a fault: the next call works.
        up.upstream.set_fault("normal")
        assert (await backend.infer({"x": _x()}))["probs"].shape == (3, N_CLASSES)
    finally:
        await backend.aclose()


async def test_nan_outputs_pass_through_unchanged(start_upstream: Any) -> None:
    # The backend transports; judging outputs (non-finite -> pair error) is the mirror's job.
    up = await start_upstream(mode="nan")
    backend = await HttpBackend.create(_settings(up.url))
    try:
        assert np.isnan((await backend.infer({"x": _x()}))["probs"]).all()
    finally:
        await backend.aclose()


async def test_unreachable_or_unknown_model_fails_at_create(start_upstream: Any) -> None:
    up = await start_upstream()
    with pytest.raises(BackendError, match="unknown model 'other'"):
        await HttpBackend.create(_settings(up.url, model="other"))
    with pytest.raises(BackendError, match="unreachable"):
        await HttpBackend.create(_settings("http://127.0.0.1:9"))


# --------------------------------------------------------------------------- decoded answers


def test_a_compressed_answer_decodes_as_zlib_does_and_a_bomb_is_refused() -> None:
    """An upstream's gzip/deflate answer (metadata, a pair's answer) decodes exactly as
    the stdlib does; one past the limit is a BackendError naming the limit, after at
    most one decode step past it (proxy/core/inflate.py), never the whole bomb."""
    import gzip
    import zlib

    from proxy.backends.http import MAX_DECODED_ANSWER, decompress

    body = b'{"model_name": "m", "outputs": []}' * 50
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decompress(gzip.compress(body), "gzip") == body
    assert decompress(zlib.compress(body), "deflate") == body
    assert decompress(raw.compress(body) + raw.flush(), "Deflate") == body  # raw RFC 1951
    assert decompress(body, None) == body
    bomb = gzip.compress(b"\0" * (4 << 20))
    with pytest.raises(BackendError, match="decompresses past 1048576 bytes"):
        decompress(bomb, "gzip", limit=1 << 20)
    assert MAX_DECODED_ANSWER >= 64 << 20  # far above any tensor answer served here
    with pytest.raises(BackendError, match="cannot decompress a gzip body"):
        decompress(b"not gzip", "gzip")
    with pytest.raises(BackendError, match="unsupported content encoding 'br'"):
        decompress(body, "br")
