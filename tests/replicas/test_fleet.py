"""The fleet stays on one decision: restarts, lost database sessions, long waits for labels.

Two in-process replicas (aiohttp test servers, the real app and coordinator) on one real
PostgreSQL. In-process rather than processes: a graceful restart is the app's cleanup
and start-up, and a lost session is made by PostgreSQL itself (pg_terminate_backend);
nothing here depends on a process dying (tests/replicas/test_replicas.py does that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select, text

from gates.simulate import Scenario, records
from proxy.control.replicas import ReplicaCoordinator
from proxy.core.config import load_config
from proxy.dataplane.state import STATE
from proxy.demo.assets import model_path
from proxy.server.app import create_app, wait_loaded
from storage.db import Database
from storage.replicas import ledger_counts, read_decider
from storage.schema import LabelRow
from storage.store import Store
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]


def _config(url: str, name: str) -> Any:
    def model(m: str) -> dict[str, Any]:
        return {"name": m, "kind": "onnx", "path": str(model_path(m)), "timeout_ms": 60000}

    return load_config(
        data={
            "server": {"model_name": "digits", "control_token": TOKEN},
            "models": {"champion": model("champion"), "candidate": model("candidate_good")},
            "storage": {"url": url, "flush_interval_ms": 50},
            # Not the default (0: the controller switches the stable service): a weight
            # after a promote that no stage has, so the restart test sees the decision.
            "lifecycle": {"canary_weight_after_promote": 1.0},
            "rollout": {
                "stages": [
                    {"name": "shadow", "min_pairs": 100_000},
                    {"name": "canary", "canary_weight": 0.25, "min_pairs": 100_000},
                ],
                "evaluate_every_s": 0.2,
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


async def _until(predicate: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Fleet:
    def __init__(self, url: str) -> None:
        self.url = url
        self.clients: dict[str, Client] = {}

    async def start(self, name: str) -> Client:
        app = create_app(_config(self.url, name), storage=True)
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        await wait_loaded(app)
        self.clients[name] = client
        return client

    async def stop(self, name: str) -> None:
        await self.clients.pop(name).close()  # graceful: last snapshot, last step

    async def get(self, name: str, path: str) -> Any:
        resp = await self.clients[name].get(path, headers=AUTH)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    def coordinator(self, name: str) -> ReplicaCoordinator:
        service = self.clients[name].app[STATE].rollout
        assert service is not None and service.coordinator is not None
        return service.coordinator

    async def deciders(self) -> list[str]:
        states = {n: (await self.get(n, "/v1/rollout"))["replica"] for n in self.clients}
        return [n for n, s in states.items() if s["decider"]]

    async def verdicts(self) -> set[str]:
        return {(await self.get(n, "/v1/rollout/verdict"))["verdict"] for n in self.clients}


@pytest.fixture
async def fleet(pg_server: PostgresServer) -> AsyncIterator[Fleet]:
    f = Fleet(pg_server.create_database(f"fleet_{uuid.uuid4().hex[:12]}"))
    try:
        yield f
    finally:
        for name in list(f.clients):
            await f.stop(name)


@pytest.mark.parametrize("action", ["promote", "abort"])
async def test_a_restarted_replica_joins_the_decision_in_force(fleet: Fleet, action: str) -> None:
    await fleet.start("a")
    await fleet.start("b")
    await _until(lambda: _one(fleet.deciders()), "one decider")
    resp = await fleet.clients["a"].post(
        f"/v1/rollout/{action}", headers=AUTH, json={"who": "ana", "why": "decided"}
    )
    assert resp.status == 200, await resp.text()

    async def on(verdict: str) -> bool:
        return await fleet.verdicts() == {verdict}

    await _until(lambda: on(action), f"both replicas on {action}")
    rollout_id = fleet.coordinator("a").rollout_id

    await fleet.stop("b")
    b = await fleet.start("b")  # a graceful restart of one pod
    # From its first answer on (no sync awaited): the fleet's rollout, its verdict, its
    # stage and canary weight; no new rollout was opened.
    assert fleet.coordinator("b").rollout_id == rollout_id
    body = await fleet.get("b", "/v1/rollout/verdict")
    assert body["verdict"] == action
    mirror = b.app[STATE].mirror
    assert mirror is not None
    weight = 1.0 if action == "promote" else 0.0
    assert mirror.canary_weight == weight and body["canary_weight"] == weight
    if action == "abort":
        assert mirror.candidate_stopped  # never mirrors to the aborted candidate again
    db = Database(fleet.url)
    try:
        assert [r.id for r in Store(db).list_rollouts()] == [rollout_id]
        # the fleet keeps serving the one decision, and exactly one is stored
        await _until(lambda: on(action), f"the fleet still on {action}")
        decisions = [d.verdict for d in Store(db).decisions(rollout_id)]
        assert decisions == [action]
    finally:
        db.dispose()


async def _one(deciders: Any) -> Any:
    got = await deciders
    return got if len(got) == 1 else None


async def test_a_terminated_lock_session_leaves_exactly_one_decider(fleet: Fleet) -> None:
    await fleet.start("a")
    await fleet.start("b")
    (leader,) = await _until(lambda: _one(fleet.deciders()), "one decider")
    lease = fleet.coordinator(leader).lease
    pid = lease.backend_pid
    assert pid is not None
    db = Database(fleet.url)
    try:
        seq = int((read_decider(db, fleet.coordinator(leader).rollout_id) or {}).get("seq", 0))
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()

        async def settled() -> Any:
            # the old holder noticed (fenced, said so) and exactly one replica decides
            if fleet.coordinator(leader).lease.lost < 1:
                return None
            return await _one(fleet.deciders())

        (now_leader,) = await _until(settled, "the old holder to notice and one decider")
        status = (await fleet.get(leader, "/v1/rollout"))["replica"]
        assert status["lease_lost"] >= 1
        # the one decider holds the lock on its own live session and keeps deciding
        holder = fleet.coordinator(now_leader).lease
        assert holder.backend_pid is not None and holder.backend_pid != pid
        rid = fleet.coordinator(leader).rollout_id

        async def stepped() -> bool:
            state = await asyncio.to_thread(read_decider, db, rid)
            return bool(state and int(state["seq"]) > seq + 2 and state["by"] == now_leader)

        await _until(stepped, "the decider to keep stepping")
        with db.engine.connect() as conn:
            holders = conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            ).scalar()
        assert holders == 1
    finally:
        db.dispose()


async def test_labels_for_long_waiting_pairs_reach_the_gates_from_any_replica(
    fleet: Fleet,
) -> None:
    """25,000 unlabelled pairs recorded by one replica, then labels for some of them
    posted to the other: all reach the gates (no cap on waiting pairs), none is
    reported unmatched. The pairs go through replica a's own recorder (the code that
    records served requests) rather than 25,000 HTTP requests, to keep the test short."""
    a = await fleet.start("a")
    await fleet.start("b")
    persistence = a.app[STATE].persistence
    assert persistence is not None and persistence.recorder is not None
    recorder = persistence.recorder
    pairs = [
        dataclasses.replace(r, id=f"wait-{i}", label=None)
        for i, r in enumerate(records(Scenario(n_classes=10), 25_000, seed=5))
    ]
    for r in pairs:
        assert recorder.submit(r)
    assert await recorder.flush(120)
    rid = fleet.coordinator("a").rollout_id
    db = Database(fleet.url)
    try:
        labelled = pairs[::15][:1600]  # spread over the whole range, oldest included
        body = [{"id": r.id, "label": i % 10} for i, r in enumerate(labelled)]
        for i in range(0, len(body), 400):
            part = body[i : i + 400]
            resp = await fleet.clients["b"].post("/v1/feedback", headers=AUTH, json=part)
            assert resp.status == 202, await resp.text()
            answer = await resp.json()
            assert answer["stored"] is True and answer["joined"] == len(part)

        async def all_gated() -> Any:
            counts = await asyncio.to_thread(ledger_counts, db, rid)
            return counts if counts == {"gated": 1600, "waiting": 0} else None

        await _until(all_gated, "every label fed to the gates")

        async def served() -> bool:
            bodies = [await fleet.get(n, "/v1/rollout/verdict") for n in ("a", "b")]
            return all(v["labels"] == 1600 for v in bodies)

        await _until(served, "both replicas to serve the evaluation with every label")
        with db.engine.connect() as conn:
            by_status = dict(
                conn.execute(select(LabelRow.status, func.count()).group_by(LabelRow.status)).all()
            )
        assert by_status == {"joined": 1600}
        for n in ("a", "b"):
            queues = (await fleet.get(n, "/v1/rollout"))["queues"]
            assert queues["labels_unmatched"] == 0
    finally:
        db.dispose()


async def test_an_ended_rollout_is_evaluated_again_only_when_its_evidence_changes(
    fleet: Fleet,
) -> None:
    """After an abort the decider keeps stepping, but writes no evaluation (no new
    gate_evaluations rows, no new seq) while the evidence stays what the last one
    counted; a label that reaches the gates afterwards is evaluated once."""
    a = await fleet.start("a")
    await fleet.start("b")
    (leader,) = await _until(lambda: _one(fleet.deciders()), "one decider")
    resp = await a.post("/v1/rollout/abort", headers=AUTH, json={"who": "ana", "why": "bad"})
    assert resp.status == 200, await resp.text()

    async def aborted() -> bool:
        return await fleet.verdicts() == {"abort"}

    await _until(aborted, "both replicas on abort")
    rid = fleet.coordinator("a").rollout_id
    db = Database(fleet.url)

    def evaluations() -> tuple[int, int, int]:
        """(decider seq, its evaluation's labels, evaluations stored)"""
        state = read_decider(db, rid) or {}
        with db.engine.connect() as conn:
            stored = conn.execute(
                text(
                    "SELECT count(DISTINCT details->>'seq') FROM gate_evaluations "
                    "WHERE rollout_id = :r"
                ),
                {"r": rid},
            ).scalar()
        return int(state["seq"]), int(state["evaluation"]["labels"]), int(stored or 0)

    async def decider_steps(n: int) -> None:
        # Each sync waits snapshot_every_s (0.1 s) before the next: n syncs span well
        # over evaluate_every_s (0.2 s), so the time cadence fell due in between.
        coordinator = fleet.coordinator(leader)
        target = coordinator.counters.snapshots + n
        await _until(
            lambda: asyncio.sleep(0, coordinator.counters.snapshots >= target),
            f"{n} decider steps",
        )

    try:
        seq, labels, stored = await asyncio.to_thread(evaluations)
        assert labels == 0
        await decider_steps(10)
        assert await asyncio.to_thread(evaluations) == (seq, 0, stored)

        # Something changed: a pair recorded (through replica a's own recorder) and its
        # label posted to b reach the ledger; the decider evaluates that once.
        persistence = a.app[STATE].persistence
        assert persistence is not None and persistence.recorder is not None
        (pair,) = records(Scenario(n_classes=10), 1, seed=3)
        assert persistence.recorder.submit(dataclasses.replace(pair, id="late-1", label=None))
        assert await persistence.recorder.flush(60)
        resp = await fleet.clients["b"].post(
            "/v1/feedback", headers=AUTH, json=[{"id": "late-1", "label": 3}]
        )
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["joined"] == 1

        async def evaluated() -> bool:
            return (await asyncio.to_thread(evaluations))[1] == 1

        await _until(evaluated, "the label evaluated")
        await decider_steps(10)
        assert await asyncio.to_thread(evaluations) == (seq + 1, 1, stored + 1)
        assert [d.verdict for d in Store(db).decisions(rid)] == ["abort"]
    finally:
        db.dispose()
