"""The proxy's HTTP surface: routes, request ids, every bad input, errors, /metrics."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from proxy.dataplane.state import STATE
from proxy.protocol.codec import HEADER_LENGTH, decode_infer_response, encode_infer_request
from proxy.server.app import create_app
from storage.sink import MemorySink
from tests.proxy.conftest import N_CLASSES, N_FEATURES, NumpyBackend, make_config
from tests.proxy.upstream import UpstreamModel

INFER = "/v2/models/classifier/infer"


def _x(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


def _json_request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
        **extra,
    }


async def _drain(proxy: Any) -> None:
    """Wait until mirrored work is done (counts, not time)."""
    mirror = proxy.state.mirror
    for _ in range(500):
        if mirror.in_flight == 0 and mirror.queued == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("mirrored work did not finish")


@pytest.fixture
async def pair(start_upstream: Any, start_proxy: Any) -> Any:
    """An in-process champion (mirrorgate is the server: it decodes, validates and
    encodes, which is what this module tests) and a remote candidate. A remote
    champion's answers pass through: tests/proxy/dataplane/test_passthrough.py."""
    champion = NumpyBackend(UpstreamModel(N_FEATURES, N_CLASSES, 1))
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(candidate.url, candidate.url), champion=champion)
    return proxy, champion, candidate


async def test_health_server_and_model_metadata(pair: Any) -> None:
    proxy, *_ = pair
    client: TestClient = proxy.client
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/classifier/ready"):
        resp = await client.get(path)
        assert resp.status == 200 and await resp.read() == b""  # Triton's answer
    server = await (await client.get("/v2")).json()
    assert server["name"] == "mirrorgate" and "binary_tensor_data" in server["extensions"]
    meta = await (await client.get("/v2/models/classifier")).json()
    assert meta["name"] == "classifier"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, N_FEATURES]}]
    assert meta["outputs"][0]["name"] == "probs"
    assert (await client.get("/v2/models/classifier/ready")).status == 200
    assert (await client.get("/v2/models/classifier/versions/1")).status == 200
    resp = await client.get("/v2/models/classifier/versions/9")
    assert resp.status == 404
    assert (await resp.json())["error"] == (
        "Request for unknown model: 'classifier' version 9 is not found"
    )


async def test_json_infer_matches_champion_and_records_a_pair(pair: Any) -> None:
    proxy, champion, candidate = pair
    x = _x(1)
    resp = await proxy.client.post(INFER, json=_json_request(x, id="req-1"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["id"] == "req-1" and resp.headers["X-Request-Id"] == "req-1"
    assert body["model_name"] == "classifier"
    assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
    probs = next(o for o in body["outputs"] if o["name"] == "probs")
    assert probs["shape"] == [1, N_CLASSES]
    np.testing.assert_allclose(
        np.array(probs["data"]).reshape(1, -1), champion.model.predict(x)["probs"], rtol=1e-6
    )
    await _drain(proxy)
    (record,) = list(proxy.sink.records)
    assert record.id == "req-1"
    np.testing.assert_allclose(record.champion.output, champion.model.predict(x)["probs"][0])
    np.testing.assert_allclose(record.candidate.output, candidate.model.predict(x)["probs"][0])
    assert record.champion.error is None and record.candidate.error is None
    # The request id travels to the upstream (its logs correlate with the pair).
    assert ("start", "req-1") in candidate.upstream.events


async def test_binary_inputs_and_outputs(pair: Any) -> None:
    proxy, champion, _ = pair
    x = _x(3)
    body, header_length = encode_infer_request({"x": x}, outputs=["label", "probs"])
    resp = await proxy.client.post(INFER, data=body, headers={HEADER_LENGTH: str(header_length)})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "application/octet-stream"
    decoded = decode_infer_response(await resp.read(), resp.headers[HEADER_LENGTH])
    assert list(decoded.outputs) == ["label", "probs"]
    expected = champion.model.predict(x)
    np.testing.assert_array_equal(decoded.outputs["label"], expected["label"])
    np.testing.assert_allclose(decoded.outputs["probs"], expected["probs"], rtol=1e-6)


async def test_request_id_from_body_then_header_then_generated(pair: Any) -> None:
    proxy, *_ = pair
    req = _json_request(_x(1), id="body-id")
    resp = await proxy.client.post(INFER, json=req, headers={"X-Request-Id": "header-id"})
    assert (await resp.json())["id"] == "body-id" and resp.headers["X-Request-Id"] == "body-id"
    resp = await proxy.client.post(
        INFER, json=_json_request(_x(1)), headers={"X-Request-Id": "header-id"}
    )
    assert (await resp.json())["id"] == "header-id"
    assert resp.headers["X-Request-Id"] == "header-id"
    ids = set()
    for _ in range(3):
        resp = await proxy.client.post(INFER, json=_json_request(_x(1)))
        rid = (await resp.json())["id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and resp.headers["X-Request-Id"] == rid
        ids.add(rid)
    assert len(ids) == 3
    await _drain(proxy)
    assert {"body-id", "header-id"} <= {r.id for r in proxy.sink.records}


def _bad_requests() -> list[tuple[str, dict[str, Any], int, str]]:
    x = _x(1)
    good = _json_request(x)

    def with_input(**fields: Any) -> bytes:
        req = json.loads(json.dumps(good))
        req["inputs"][0].update(fields)
        return json.dumps(req).encode()

    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, N_FEATURES],
                    "parameters": {"binary_data_size": 4 * N_FEATURES},
                }
            ]
        }
    ).encode()
    return [
        ("malformed json", {"data": b'{"inputs": [}'}, 400, "not valid JSON"),
        ("invalid utf-8", {"data": b'{"id": "\xc3\x28"}'}, 400, "not valid UTF-8"),
        ("deep nesting", {"data": b"[" * 50_000 + b"]" * 50_000}, 400, "nested too deeply"),
        ("wrong datatype", {"data": with_input(datatype="FP99")}, 400, "unknown datatype 'FP99'"),
        (
            "model datatype mismatch",
            {"data": with_input(datatype="FP64")},
            400,
            "has datatype FP64; the model expects FP32",
        ),
        (
            "shape/data mismatch",
            {"data": with_input(shape=[2, N_FEATURES])},
            400,
            f"needs {2 * N_FEATURES} elements, data has {N_FEATURES}",
        ),
        ("unknown input", {"data": with_input(name="pixels")}, 400, "unknown input 'pixels'"),
        (
            "unknown output",
            {"data": json.dumps({**good, "outputs": [{"name": "logits"}]}).encode()},
            400,
            "unknown output 'logits'",
        ),
        (
            "binary header past the body",
            {"data": head, "headers": {HEADER_LENGTH: str(len(head) + 10)}},
            400,
            "body has only",
        ),
        (
            "binary data past the body",
            {"data": head + b"\0" * 4, "headers": {HEADER_LENGTH: str(len(head))}},
            400,
            "runs past the body",
        ),
        (
            "body too large",
            {"data": b"{" + b" " * (2 * 1024 * 1024)},
            413,
            "the limit is 1048576 bytes (server.max_body_bytes)",
        ),
    ]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [c[1:] for c in _bad_requests()],
    ids=[c[0] for c in _bad_requests()],
)
async def test_bad_input_gets_status_and_message_and_server_keeps_serving(
    start_upstream: Any,
    start_proxy: Any,
    kwargs: dict[str, Any],
    status: int,
    message: str,
) -> None:
    champion = NumpyBackend(UpstreamModel(N_FEATURES, N_CLASSES, 1))
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(
        make_config(candidate.url, candidate.url, server={"max_body_bytes": 1024 * 1024}),
        champion=champion,
    )
    resp = await proxy.client.post(INFER, **kwargs)
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    error = (await resp.json())["error"]
    assert message in error
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code=str(status)) == 1.0
    # Nothing reached a model, nothing was recorded, and the next request is served.
    assert champion.calls == 0 and candidate.upstream.stats.started == 0
    ok = await proxy.client.post(INFER, json=_json_request(_x(1)))
    assert ok.status == 200
    await _drain(proxy)
    assert len(proxy.sink.records) == 1


async def test_unknown_model_route_and_method(pair: Any) -> None:
    proxy, *_ = pair
    resp = await proxy.client.post("/v2/models/other/infer", json=_json_request(_x(1)))
    assert resp.status == 404
    assert (await resp.json())["error"] == "Request for unknown model: 'other' is not found"
    resp = await proxy.client.get("/v2/models/other")
    assert resp.status == 404
    resp = await proxy.client.get("/nope")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await proxy.client.get(INFER)
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    assert "error" in await resp.json()


async def test_champion_failure_is_5xx_with_reason_and_no_pair(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    # The champion's own deadline is what the live path waits (2 s, not the default
    # 10 s: the hanging call below waits it out; ample for the 500, answered at once).
    config = make_config(champion.url, candidate.url, models={"champion": {"timeout_ms": 2000}})
    proxy = await start_proxy(config)
    champion.upstream.set_fault("error", status=500, message="model exploded")
    resp = await proxy.client.post(INFER, json=_json_request(_x(1)))
    # A remote champion's error passes through as it wrote it (status and body).
    assert resp.status == 500
    assert json.loads(await resp.read()) == {"error": "model exploded"}
    champion.upstream.set_fault("hang")
    resp = await proxy.client.post(INFER, json=_json_request(_x(1)))
    assert resp.status == 504 and "timed out" in (await resp.json())["error"]
    await _drain(proxy)
    assert len(proxy.sink.records) == 0
    assert candidate.upstream.stats.started == 0
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="500") == 1.0
    assert proxy.metric("mirrorgate_proxy_requests_total", role="champion", code="504") == 1.0


async def test_metrics_endpoint(pair: Any) -> None:
    proxy, *_ = pair
    for i in range(3):
        assert (await proxy.client.post(INFER, json=_json_request(_x(1, i)))).status == 200
    await _drain(proxy)
    resp = await proxy.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'mirrorgate_proxy_requests_total{code="200",role="champion"} 3.0' in text
    assert 'mirrorgate_proxy_requests_total{code="200",role="candidate"} 3.0' in text
    assert 'mirrorgate_proxy_request_duration_seconds_count{role="champion"} 3.0' in text
    assert (
        'mirrorgate_proxy_request_duration_seconds_bucket{le="+Inf",role="candidate"} 3.0' in text
    )
    for name in (
        "mirrorgate_shadow_in_flight 0.0",
        "mirrorgate_shadow_queue_depth 0.0",
        'mirrorgate_rollout_stage{stage="shadow"} 1.0',
        "mirrorgate_rollout_canary_weight 0.0",
        "# TYPE mirrorgate_shadow_dropped_total counter",
        "# TYPE mirrorgate_shadow_failures_total counter",
        "# TYPE mirrorgate_gate_status gauge",
        "# TYPE mirrorgate_rollout_verdict gauge",
    ):
        assert name in text


async def test_readiness_is_400_until_models_load_and_after_load_failure(
    start_upstream: Any, aiohttp_client: Any
) -> None:
    champion = await start_upstream(seed=1)
    champion.upstream.hold_metadata = True
    champion.upstream.set_fault("hold")
    app = create_app(make_config(champion.url), sinks=[MemorySink()])
    client = await aiohttp_client(app)
    resp = await client.get("/v2/health/ready")
    # Triton's not-ready: 400, empty body; the reason in a header.
    assert resp.status == 400 and await resp.read() == b""
    assert "loading" in resp.headers["X-Mirrorgate-Not-Ready"]
    assert (await client.get("/v2/health/live")).status == 200
    resp = await client.post(INFER, json=_json_request(_x(1)))
    assert resp.status == 503
    champion.upstream.release()
    await app[STATE].loading
    assert (await client.get("/v2/health/ready")).status == 200

    broken = create_app(make_config("http://127.0.0.1:9"), sinks=[MemorySink()])
    client = await aiohttp_client(broken)
    with pytest.raises(Exception, match="unreachable"):
        await broken[STATE].loading
    resp = await client.get("/v2/health/ready")
    assert resp.status == 400 and "model load failed" in resp.headers["X-Mirrorgate-Not-Ready"]


async def test_lifecycle_closes_backends_and_flushes_sinks(
    start_upstream: Any, aiohttp_client: Any
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    sink = MemorySink()
    app = create_app(make_config(champion.url, candidate.url), sinks=[sink])
    client = await aiohttp_client(app)
    await app[STATE].loading
    for i in range(4):
        assert (await client.post(INFER, json=_json_request(_x(1, i)))).status == 200
    state = app[STATE]
    await client.close()  # runs the cleanup context: drain, close backends, close sinks
    assert sink.closed and len(sink.records) == 4
    assert state.champion is not None and state.champion._session.closed  # type: ignore[attr-defined]
    assert state.candidate is not None and state.candidate._session.closed  # type: ignore[attr-defined]
