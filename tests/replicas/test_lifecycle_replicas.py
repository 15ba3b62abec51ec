"""Rollout lifecycle with several replicas: a start on one, every replica follows.

Two in-process apps on one real PostgreSQL (as test_manual_any_replica): a controller's
``POST /v1/rollouts`` lands on one replica; the other follows within a few snapshot
periods, so a verdict asked of either is the new revision's, the previous revision's is
refused on both, and an abort decided on the new rollout holds on both. A restarted
replica joins the newest rollout instead of opening one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.core.config import load_config
from proxy.demo.assets import model_path
from proxy.server.app import create_app, wait_loaded
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

READ, WRITE = "r-token", "w-token"
R = {"Authorization": f"Bearer {READ}"}
W = {"Authorization": f"Bearer {WRITE}"}


def _config(url: str, name: str) -> Any:
    def model(m: str) -> dict[str, Any]:
        return {"name": m, "kind": "onnx", "path": str(model_path(m)), "timeout_ms": 60000}

    return load_config(
        data={
            "server": {"model_name": "digits"},
            "control": {"read_token": READ, "write_token": WRITE},
            "models": {"champion": model("champion"), "candidate": model("candidate_good")},
            "storage": {"url": url, "flush_interval_ms": 50},
            "rollout": {"stages": [{"name": "shadow", "min_pairs": 10_000}]},
            "replicas": {
                "enabled": True,
                "replica_id": name,
                "snapshot_every_s": 0.1,
                "lease_retry_s": 0.1,
            },
        },
        env={},
    )


async def _until(predicate: Any, what: str, timeout_s: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _start(url: str, name: str) -> TestClient[Any, Any]:
    app = create_app(_config(url, name), storage=True)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    await wait_loaded(app)
    return client


async def test_a_rollout_started_on_one_replica_is_followed_by_all(
    pg_server: PostgresServer,
) -> None:
    url = pg_server.create_database("lifecycle")
    clients = [await _start(url, "a"), await _start(url, "b")]
    try:

        async def verdicts(revision: str) -> list[tuple[int, Any]]:
            out = []
            for c in clients:
                resp = await c.get(f"/v1/rollout/verdict?revision={revision}", headers=R)
                out.append((resp.status, await resp.json()))
            return out

        resp = await clients[0].post("/v1/rollouts", json={"revision": "v1"}, headers=W)
        started = await resp.json()
        assert resp.status == 201, started

        async def all_on_v1() -> bool:
            got = await verdicts("v1")
            return all(s == 200 and b["rollout_id"] == started["rollout_id"] for s, b in got)

        await _until(all_on_v1, "both replicas on v1")
        # an abort sent to the other replica holds on both, for v1 only
        resp = await clients[1].post(
            "/v1/rollout/abort", json={"who": "ana", "why": "bad"}, headers=W
        )
        assert resp.status == 200, await resp.json()

        async def all_aborted() -> bool:
            return all(b.get("verdict") == "abort" for _, b in await verdicts("v1"))

        await _until(all_aborted, "both replicas to abort v1")
        assert [s for s, _ in await verdicts("v2")] == [409, 409]

        # a restarted replica joins the newest rollout (aborted), opening none
        await clients[1].close()
        clients[1] = await _start(url, "b")
        await _until(all_aborted, "the restarted replica to serve the abort")

        resp = await clients[1].post("/v1/rollouts", json={"revision": "v2"}, headers=W)
        second = await resp.json()
        assert resp.status == 201, second

        async def all_on_v2() -> bool:
            got = await verdicts("v2")
            return all(
                s == 200 and b["rollout_id"] == second["rollout_id"] and b["verdict"] == "continue"
                for s, b in got
            )

        await _until(all_on_v2, "both replicas on v2")
        assert [s for s, _ in await verdicts("v1")] == [409, 409]
        listed = await (await clients[0].get("/v1/rollouts", headers=R)).json()
        revisions = [(r["revision"], r["status"]) for r in listed["rollouts"]]
        assert revisions[:2] == [("v2", "active"), ("v1", "aborted")]
    finally:
        for c in clients:
            await c.close()
