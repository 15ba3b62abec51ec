"""The HTTP driver against a real aiohttp server on loopback.

The server is a stand-in for the proxy (built on another branch): it speaks the two routes
the driver uses, answers with the real champion's outputs, and records arrival order, so
the test can check what the proxy would receive.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from proxy.demo import assets
from proxy.demo.driver import drive
from proxy.demo.offline import OfflineModel
from proxy.demo.traffic import SLICE_HEADER, ScenarioSettings, Traffic

TOKEN = "s3cret"
SMALL = ScenarioSettings(
    name="small",
    requests=120,
    seed=11,
    rows_per_request={1: 0.5, 2: 0.5},
    label_rate=0.9,
    label_delay_requests=5.0,
    feedback_every=4,
    rate_rps=2000.0,
)


class StandIn:
    def __init__(self, model: OfflineModel) -> None:
        self.model = model
        self.answered: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []
        self.label_before_answer: list[str] = []
        self.fail_ids: set[str] = set()

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.json()
        rid = body["id"]
        (tensor,) = body["inputs"]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        self.requests.append(
            {
                "id": rid,
                "platform": request.headers[SLICE_HEADER],
                "features": x,
                "model": request.match_info["model"],
                "header_id": request.headers["X-Request-Id"],
            }
        )
        if rid in self.fail_ids:
            return web.json_response({"error": "champion failed"}, status=502)
        probs = await asyncio.get_running_loop().run_in_executor(None, self.model.predict_proba, x)
        self.answered.add(rid)
        return web.json_response(
            {
                "id": rid,
                "model_name": "m",
                "outputs": [
                    {
                        "name": "probabilities",
                        "shape": list(probs.shape),
                        "datatype": "FP32",
                        "data": probs.ravel().tolist(),
                    }
                ],
            }
        )

    async def feedback(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        for item in await request.json():
            request_id = item["id"].split("#")[0]
            if request_id not in self.answered:
                self.label_before_answer.append(item["id"])
            self.labels.append(item)
        return web.json_response({"accepted": True})


@pytest.fixture
def stand_in(models: dict[str, OfflineModel]) -> StandIn:
    return StandIn(models[assets.CHAMPION])


@pytest.fixture
async def base_url(aiohttp_server: Any, stand_in: StandIn) -> str:
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", stand_in.infer)
    app.router.add_post("/v1/feedback", stand_in.feedback)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


async def test_drive_sends_every_request_and_label_in_order(
    base_url: str, stand_in: StandIn, pool: assets.DemoPool
) -> None:
    traffic = Traffic(SMALL, pool)
    seen_progress: list[int] = []
    stats = await drive(
        traffic,
        base_url,
        model="digits",
        control_token=TOKEN,
        concurrency=6,
        on_progress=lambda s: seen_progress.append(s.answered),
        progress_every=40,
    )
    expected = list(traffic.requests())
    assert stats.requests == len(expected) == len(stand_in.requests)
    assert stats.responses == {200: len(expected)}
    assert stats.transport_errors == 0
    by_id = {r["id"]: r for r in stand_in.requests}
    for req in expected:
        got = by_id[req.id]
        assert got["platform"] == req.platform and got["model"] == "digits"
        assert got["header_id"] == req.id
        np.testing.assert_array_equal(got["features"], req.features)
    labels = traffic.labels()
    assert stats.labels == len(labels) == len(stand_in.labels)
    assert sorted(x["id"] for x in stand_in.labels) == sorted(x.id for x in labels)
    assert stats.feedback_responses == {200: stats.feedback_posts}
    assert stand_in.label_before_answer == []
    assert seen_progress == [40, 80, 120]


async def test_drive_counts_errors_and_stops_on_request(
    base_url: str, stand_in: StandIn, pool: assets.DemoPool
) -> None:
    traffic = Traffic(SMALL, pool)
    stand_in.fail_ids = {traffic.request_id(3), traffic.request_id(7)}
    stats = await drive(traffic, base_url, model="digits", control_token="wrong", concurrency=2)
    assert stats.responses == {200: SMALL.requests - 2, 502: 2}
    assert stats.feedback_responses.keys() == {401}

    stand_in.requests.clear()
    stats = await drive(
        traffic,
        base_url,
        model="digits",
        concurrency=1,
        should_stop=lambda: len(stand_in.requests) >= 30,
    )
    assert stats.stopped_early and stats.requests == 30 == len(stand_in.requests)


async def test_drive_refuses_nonsense_concurrency(base_url: str, pool: assets.DemoPool) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await drive(Traffic(SMALL, pool), base_url, model="m", concurrency=0)
