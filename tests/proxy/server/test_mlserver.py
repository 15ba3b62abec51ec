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

from proxy.core.config import load_config
from tests.proxy.conftest import LIVE_PATHS
from tests.support.mlserver import MLServer, MLServerUnavailable, ensure_venv, write_model

REQUIRE = os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1"
MODEL = "digits"
TOKEN = "mls-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    """Every test here holds on both live paths (``server.live_path``)."""
    return str(request.param)


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


@pytest.fixture(scope="module")
def without_eight(mlservers: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The logreg champion against an MLP candidate trained without class 8 (issue 12)."""
    venv = ensure_venv()  # built by `mlservers` already
    root = tmp_path_factory.mktemp("mlserver-mlp-no8")
    write_model(venv, root / MODEL, name=MODEL, version="v1", kind="mlp", without=8)
    server = MLServer(venv, root)
    try:
        server.wait_ready(MODEL)
        yield Pair(mlservers.champion, server)
    finally:
        server.stop()


def _digits(rows: int, offset: int = 1300) -> np.ndarray:
    return _labelled_digits(rows, offset)[0]


def _labelled_digits(rows: int, offset: int = 1300) -> tuple[np.ndarray, np.ndarray]:
    """Digits the models never saw in training (they train on the first 1,200)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[offset : offset + rows] / 16.0).astype(np.float32), y[offset : offset + rows]


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


async def _rollout_until(
    proxy: Any, path: str, done: Any, what: str, deadline_polls: int = 1200
) -> dict[str, Any]:
    """Poll the control plane (``GET path``) until ``done(body)``; generous deadline."""
    body: dict[str, Any] = {}
    for _ in range(deadline_polls):
        resp = await proxy.client.get(path, headers=AUTH)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        if done(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} never happened; last {path}: {json.dumps(body)[:3000]}")


async def test_candidate_without_class_8_aborts_on_contract_within_50_pairs(
    without_eight: Pair, start_proxy: Any
) -> None:
    """Issue 12's first MLServer finding: 10 vs 9 predict_proba columns used to make every
    pair "not comparable" and the verdict stayed `continue` forever."""
    proxy = await start_proxy(
        _config(
            without_eight,
            server={"model_name": MODEL, "control_token": TOKEN},
            output={"task": "classification", "output": "predict_proba"},
            # a look every 5 pairs (or 0.2 s): the abort is seen at the first look that
            # has the evidence, not after the default 1,000 pairs
            rollout={"evaluate_every_pairs": 5, "evaluate_every_s": 0.2},
        )
    )
    x = _digits(50, offset=1200)
    rows = 5
    for i in range(0, len(x), rows):
        body = _json_body(x[i : i + rows], f"no8-{i}", outputs=[{"name": "predict_proba"}])
        resp = await proxy.client.post(
            f"/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "application/json"}
        )
        through = await resp.read()
        status, direct = await _direct(
            without_eight.champion.url, "POST", f"/v2/models/{MODEL}/infer", body
        )
        assert resp.status == status == 200, through
        assert through == direct  # the client gets MLServer's own answer, byte for byte
        out = json.loads(through)["outputs"][0]
        assert out["name"] == "predict_proba" and out["shape"] == [rows, 10]
    # the candidate really answers 9 columns (asked directly)
    status, cand = await _direct(
        without_eight.candidate.url, "POST", f"/v2/models/{MODEL}/infer", body
    )
    assert status == 200 and json.loads(cand)["outputs"][0]["shape"] == [rows, 9]

    # Only 50 pairs ever exist: an abort is an abort within 50 pairs.
    verdict = await _rollout_until(
        proxy, "/v1/rollout/verdict", lambda v: v["verdict"] == "abort", "an abort"
    )
    assert verdict["pairs"] <= 50, verdict
    # the contract decides first (the broken pairs also count as candidate errors)
    assert verdict["failing"][0] == "contract", verdict
    assert verdict["reason"].startswith("abort at stage shadow after"), verdict["reason"]
    assert ": contract FAIL" in verdict["reason"], verdict["reason"]
    # its reason names both shapes
    assert "class count: candidate [9] vs champion [10]" in verdict["reason"], verdict["reason"]
    full = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    contract = next(g for g in full["gates"] if g["name"] == "contract")
    assert contract["status"] == "FAIL" and contract["blocking"], contract
    assert contract["details"]["champion"].startswith("predict_proba FP64 [10] per row")
    assert contract["details"]["candidate"].startswith("predict_proba FP64 [9] per row")


async def test_class_index_predict_output_accuracy_uses_every_labelled_pair(
    mlservers: Pair, start_proxy: Any
) -> None:
    """Issue 12's second MLServer finding: MLServer's default `predict` (one INT64 class per
    row) was read as P(class 1), so `metric.accuracy` used only the pairs labelled 0 or 1."""
    proxy = await start_proxy(
        _config(
            mlservers,
            server={"model_name": MODEL, "control_token": TOKEN},
            output={"task": "classification"},
            gates={
                # Both MLServers share this loaded 2-core machine with the test: latency
                # measures the neighbours, and an abort would stop the mirror mid-test.
                "latency": {"blocking": False},
            },
            # never advances or promotes during the test: every pair stays in one stage
            rollout={
                "stages": [
                    {"name": "shadow", "min_pairs": 100_000, "min_labels": 0, "min_duration_s": 0}
                ],
                "evaluate_every_pairs": 50,
                "evaluate_every_s": 0.2,
            },
        )
    )
    x, y = _labelled_digits(400, offset=1300)
    rows = 8
    pred_champion: list[int] = []
    pred_candidate: list[int] = []
    for i in range(0, len(x), rows):
        rid = f"idx-{i:04d}"
        body = _json_body(x[i : i + rows], rid)  # no output named: MLServer's `predict`
        resp = await proxy.client.post(
            f"/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "application/json"}
        )
        through = await resp.read()
        assert resp.status == 200, through
        out = json.loads(through)["outputs"][0]
        assert out["name"] == "predict" and out["datatype"] == "INT64"
        pred_champion.extend(np.asarray(out["data"]).ravel().tolist())
        # the candidate's own answer, asked directly: the oracle's other side
        status, direct = await _direct(
            mlservers.candidate.url, "POST", f"/v2/models/{MODEL}/infer", body
        )
        assert status == 200, direct
        pred_candidate.extend(np.asarray(json.loads(direct)["outputs"][0]["data"]).ravel())
        labels = [{"id": f"{rid}#{j}", "label": int(y[i + j])} for j in range(len(x[i : i + rows]))]
        fed = await proxy.client.post("/v1/feedback", json=labels, headers=AUTH)
        assert fed.status == 202, await fed.text()
    n = len(y)
    assert set(y.tolist()) == set(range(10))
    assert np.sum(y > 1) > n // 2  # most labels are neither 0 nor 1

    def accuracy(body: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (g for g in body["gates"] if g["name"] == "metric.accuracy" and g["slice"] == "*"),
            None,
        )

    full = await _rollout_until(
        proxy,
        "/v1/rollout",
        lambda b: b["labels"] >= n and (a := accuracy(b)) is not None and a["n"] >= n,
        f"metric.accuracy over {n} labelled pairs",
    )
    acc = accuracy(full)
    assert acc is not None
    # read as what it is: one class id per row (asked in the gates' own worker thread)
    kind = await proxy.state.rollout.call(lambda engine: engine.gates["metric"].kind)
    assert kind == "class_index"
    assert acc["n"] == n  # every labelled pair, not only those labelled 0 or 1
    truth = np.asarray(y)
    assert acc["details"]["champion"] == pytest.approx(np.mean(np.asarray(pred_champion) == truth))
    assert acc["details"]["candidate"] == pytest.approx(
        np.mean(np.asarray(pred_candidate) == truth)
    )
    # ... and on every class: each class's recall cell holds that class's labelled pairs
    champion, candidate = np.asarray(pred_champion), np.asarray(pred_candidate)
    recall = {g["slice"]: g for g in full["gates"] if g["name"] == "metric.recall"}
    for k in range(10):
        cell, rows_k = recall[f"class={k}"], truth == k
        assert cell["n"] == rows_k.sum(), cell
        assert cell["details"]["champion"] == pytest.approx(np.mean(champion[rows_k] == k))
        assert cell["details"]["candidate"] == pytest.approx(np.mean(candidate[rows_k] == k))
    assert full["verdict"] == "continue", full["reason"]
