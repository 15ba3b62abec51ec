"""Control plane under bad input: no token, no entry; labels say joined or pending.

Semantics chosen for labels (issue 3 lets a label arrive before its pair): ``POST
/v1/feedback`` answers 202 with a status per label — ``joined`` when its pair had been
seen (the label now counts), ``pending`` when no pair with that id exists yet (it waits up
to ``storage.label_window_s``). A pending label whose pair never comes is reported in
``GET /v1/rollout`` (``queues.labels_unmatched`` and ``labels_unmatched_recent`` with the
reason), never silently lost. Malformed labels are a 400 naming the fault.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.helpers import AUTH, TOKEN, body, until
from tests.proxy.conftest import make_config

ROUTES = [
    ("POST", "/v1/feedback"),
    ("GET", "/v1/rollout"),
    ("GET", "/v1/rollout/verdict"),
    ("POST", "/v1/rollout/promote"),
    ("POST", "/v1/rollout/abort"),
    ("POST", "/v1/rollout/pause"),
    ("POST", "/v1/rollout/resume"),
]


async def _proxy(start_upstream: Any, start_proxy: Any, **sections: Any) -> Any:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(champion.url, candidate.url, server={"control_token": TOKEN}, **sections)
    return await start_proxy(config)


async def test_no_route_answers_without_the_exact_token(
    start_upstream: Any, start_proxy: Any
) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    bad = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"bearer{TOKEN}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
    ]
    for method, path in ROUTES:
        for headers in bad:
            resp = await proxy.client.request(
                method, path, headers=headers, json={"id": "a", "label": 1, "who": "x", "why": "y"}
            )
            assert resp.status == 401, (method, path, headers)
            assert (await resp.json())["error"]
    # Nothing happened: no label queued, no manual decision taken.
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    assert status["queues"]["labels_pending"] == 0
    assert status["queues"]["join_labels_waiting"] == 0
    assert status["stage"] == "shadow" and not status["paused"]


async def test_labels_are_joined_or_pending_and_unmatched_ones_are_reported(
    start_upstream: Any, start_proxy: Any
) -> None:
    proxy = await _proxy(start_upstream, start_proxy, storage={"label_window_s": 0.5})
    for i in range(3):
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
        assert resp.status == 200
    await until(lambda: len(proxy.sink.records) == 3, "3 pairs")

    labels = [{"id": "r0", "label": 1}, {"id": "r1", "label": 0}, {"id": "ghost", "label": 2}]
    resp = await proxy.client.post("/v1/feedback", json=labels, headers=AUTH)
    assert resp.status == 202
    doc = await resp.json()
    assert doc["accepted"] == 3 and doc["joined"] == 2 and doc["pending"] == 1
    assert doc["labels"] == [
        {"id": "r0", "status": "joined"},
        {"id": "r1", "status": "joined"},
        {"id": "ghost", "status": "pending"},
    ]

    # A label may come before its pair: "early" joins when its request arrives.
    resp = await proxy.client.post("/v1/feedback", json={"id": "r9", "label": 1}, headers=AUTH)
    assert (await resp.json())["labels"] == [{"id": "r9", "status": "pending"}]
    resp = await proxy.client.post("/v2/models/classifier/infer", json=body(9))
    assert resp.status == 200
    await until(lambda: len(proxy.sink.records) == 4, "the pair of r9")

    async def reported() -> bool:
        status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
        return bool(status["queues"]["labels_unmatched"] >= 1)

    # "ghost" never meets a pair: past the window it is reported with the reason.
    await until(reported, "the ghost label reported unmatched")
    await proxy.state.rollout.evaluate_now()
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    queues = status["queues"]
    assert queues["labels_unmatched"] == 1
    assert [u["id"] for u in queues["labels_unmatched_recent"]] == ["ghost"]
    assert "label_window_s" in queues["labels_unmatched_recent"][0]["reason"]
    assert status["labels"] == 3  # r0, r1 and r9 reached the gates labelled


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([], "no labels"),
        ({"id": "r0"}, "label: missing"),
        ({"id": "", "label": 1}, "id"),
        ({"id": 5, "label": 1}, "id"),
        ({"id": "r0", "label": True}, "label"),
        ({"id": "r0", "label": float("inf")}, "label"),
        ({"id": "r0", "label": [1, "a"]}, "label"),
        ({"id": "r0", "label": 1, "ts": "yesterday"}, "ts"),
        ({"id": "r0", "label": 1, "colour": "red"}, "unknown field"),
        ([{"id": "r0", "label": 1}, 7], "labels[1]"),
        ("label", "expected an object"),
    ],
)
async def test_malformed_labels_are_rejected_and_none_is_taken(
    start_upstream: Any, start_proxy: Any, payload: Any, needle: str
) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    resp = await proxy.client.post("/v1/feedback", json=payload, headers=AUTH)
    assert resp.status == 400
    assert needle in (await resp.json())["error"]
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    assert status["queues"]["join_labels_waiting"] == 0 and status["labels"] == 0


async def test_labels_with_nowhere_to_go_are_refused(start_upstream: Any, start_proxy: Any) -> None:
    champion = await start_upstream(seed=1)
    proxy = await start_proxy(make_config(champion.url, server={"control_token": TOKEN}))
    resp = await proxy.client.post("/v1/feedback", json={"id": "r0", "label": 1}, headers=AUTH)
    assert resp.status == 503
    assert "nowhere" in (await resp.json())["error"]
