"""Operators' actions on any replica: two in-process apps on one PostgreSQL.

In-process (aiohttp test servers) rather than processes: nothing here depends on a
process dying, and the manual path is the same code. A pause sent to the follower holds
both replicas; a resume and a promote sent to either are recorded once, with who and
why; a second promote is refused (409) on both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.core.config import load_config
from proxy.dataplane.state import STATE
from proxy.demo.assets import model_path
from proxy.server.app import create_app, wait_loaded
from storage.db import Database
from storage.store import Store
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(url: str, name: str) -> Any:
    def model(m: str) -> dict[str, Any]:
        return {"name": m, "kind": "onnx", "path": str(model_path(m)), "timeout_ms": 60000}

    return load_config(
        data={
            "server": {"model_name": "digits", "control_token": TOKEN},
            "models": {"champion": model("champion"), "candidate": model("candidate_good")},
            "storage": {"url": url, "flush_interval_ms": 50},
            "rollout": {
                "stages": [
                    {"name": "shadow", "min_pairs": 10_000},
                    {"name": "canary", "canary_weight": 0.25, "min_pairs": 10_000},
                ]
            },
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


async def test_manual_actions_on_any_replica_are_shared(pg_server: PostgresServer) -> None:
    url = pg_server.create_database("manual")
    clients: list[TestClient[Any, Any]] = []
    try:
        for name in ("a", "b"):
            app = create_app(_config(url, name), storage=True)
            client: TestClient[Any, Any] = TestClient(TestServer(app))
            await client.start_server()
            await wait_loaded(app)
            clients.append(client)

        async def get(c: TestClient[Any, Any], path: str) -> Any:
            resp = await c.get(path, headers=AUTH)
            assert resp.status == 200
            return await resp.json()

        async def one_decider() -> Any:
            states = [(await get(c, "/v1/rollout"))["replica"] for c in clients]
            deciders = [i for i, s in enumerate(states) if s["decider"]]
            return deciders if len(deciders) == 1 else None

        (leader,) = await _until(one_decider, "one decider")
        follower = clients[1 - leader]

        async def verdicts(want: str) -> bool:
            got = [(await get(c, "/v1/rollout/verdict"))["verdict"] for c in clients]
            return got == [want] * len(clients)

        resp = await follower.post(
            "/v1/rollout/pause", headers=AUTH, json={"who": "ana", "why": "investigating"}
        )
        assert resp.status == 200 and (await resp.json())["verdict"] == "hold"
        await _until(lambda: verdicts("hold"), "both replicas to hold")

        resp = await clients[leader].post(
            "/v1/rollout/resume", headers=AUTH, json={"who": "bo", "why": "fine"}
        )
        assert resp.status == 200 and (await resp.json())["verdict"] == "continue"
        resp = await follower.post(
            "/v1/rollout/promote", headers=AUTH, json={"who": "ana", "why": "signed off"}
        )
        assert resp.status == 200 and (await resp.json())["verdict"] == "promote"
        await _until(lambda: verdicts("promote"), "both replicas to promote")
        for c in clients:
            again = await c.post("/v1/rollout/promote", headers=AUTH, json={"who": "x", "why": "y"})
            assert again.status == 409
            body = await get(c, "/v1/rollout")
            # lifecycle.canary_weight_after_promote (default 0: the champion serves until
            # the controller switches the stable service)
            assert body["canary_weight"] == 0.0
            assert c.app[STATE].mirror.canary_weight == 0.0  # type: ignore[union-attr]

        rollout_id = clients[0].app[STATE].persistence.rollout_id  # type: ignore[union-attr]
        db = Database(url)
        try:
            stored = Store(db).decisions(rollout_id)
            assert [(d.verdict, d.actor, d.reason) for d in stored] == [
                ("pause", "ana", "investigating"),
                ("resume", "bo", "fine"),
                ("promote", "ana", "signed off"),
            ]
            assert Store(db).get_rollout(rollout_id).status == "promoted"
        finally:
            db.dispose()
    finally:
        for c in clients:
            await c.close()
