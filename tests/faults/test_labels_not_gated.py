"""Labels whose pair will never be gated do not wait in the gates' join, and are stored.

After an abort the candidate is stopped: no request gets a pair any more, so a label for
one would wait in the join for ``storage.label_window_s`` (24 h by default) — the soak's
memory growth (docs/faults.md). Such labels are answered ``not_gated``, counted, kept out
of the join, and still written to the database. The same holds for requests the mirror
chose not to mirror (here: ``mirror.sample_rate: 0``).

The real proxy app with storage on (SQLite file) in front of real V2 upstreams.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from storage.store import Store
from tests.faults.helpers import AUTH, TOKEN, body
from tests.proxy.conftest import make_config

LABELLED = 40


async def _start(start_upstream: Any, start_proxy: Any, tmp_path: Path, **sections: Any) -> Any:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        server={"control_token": TOKEN},
        storage={"url": f"sqlite:///{tmp_path / 'm.sqlite'}", "flush_interval_ms": 20},
        **sections,
    )
    return await start_proxy(config, storage=True)


async def _post_labels(proxy: Any, first: int) -> dict[str, Any]:
    labels = [{"id": f"r{i}", "label": i % 2} for i in range(first, first + LABELLED)]
    resp = await proxy.client.post("/v1/feedback", json=labels, headers=AUTH)
    assert resp.status == 202, await resp.text()
    doc: dict[str, Any] = await resp.json()
    return doc


async def _stored_labels(proxy: Any) -> int:
    persistence = proxy.state.persistence
    assert await persistence.recorder.flush(timeout_s=60)
    counts = await asyncio.to_thread(Store(persistence.db).label_counts)
    return int(counts.pending + counts.joined + counts.orphaned)


async def _queues(proxy: Any) -> dict[str, Any]:
    status = await (await proxy.client.get("/v1/rollout", headers=AUTH)).json()
    queues: dict[str, Any] = status["queues"]
    return queues


async def test_labels_after_an_abort_do_not_wait_in_the_join(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await _start(start_upstream, start_proxy, tmp_path)
    resp = await proxy.client.post(
        "/v1/rollout/abort", headers=AUTH, json={"who": "ana", "why": "bad candidate"}
    )
    assert resp.status == 200 and (await resp.json())["verdict"] == "abort"
    assert proxy.state.mirror.candidate_stopped

    for i in range(LABELLED):
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
        assert resp.status == 200
    doc = await _post_labels(proxy, 0)
    assert doc["accepted"] == LABELLED
    assert doc["not_gated"] == LABELLED and doc["pending"] == 0 and doc["joined"] == 0
    assert {label["status"] for label in doc["labels"]} == {"not_gated"}

    await proxy.state.rollout.evaluate_now()  # labels queued for the gates taken in too
    queues = await _queues(proxy)
    assert queues["join_labels_waiting"] == 0
    assert queues["labels_not_gated"] == LABELLED
    assert queues["labels_unmatched"] == 0  # not waiting, so never reported missing
    # The database has every one of them.
    assert await _stored_labels(proxy) == LABELLED
    assert len(proxy.sink.records) == 0  # no pair was made after the abort


async def test_labels_of_requests_not_mirrored_do_not_wait(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    proxy = await _start(start_upstream, start_proxy, tmp_path, mirror={"sample_rate": 0.0})
    for i in range(LABELLED):
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
        assert resp.status == 200
    # A label for a request never seen (it may still arrive) waits as before.
    resp = await proxy.client.post("/v1/feedback", json={"id": "later", "label": 1}, headers=AUTH)
    assert (await resp.json())["labels"] == [{"id": "later", "status": "pending"}]

    doc = await _post_labels(proxy, 0)
    assert doc["not_gated"] == LABELLED and doc["pending"] == 0
    await proxy.state.rollout.evaluate_now()
    queues = await _queues(proxy)
    assert queues["join_labels_waiting"] == 1  # "later" only
    assert queues["labels_not_gated"] == LABELLED
    assert await _stored_labels(proxy) == LABELLED + 1
