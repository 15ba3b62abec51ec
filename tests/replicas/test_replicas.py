"""Three ``mirrorgate serve`` processes on loopback, one PostgreSQL, one decision.

The demo's regressed candidate (worse on platform=mobile) is served by three replicas,
each a real child process running the real ONNX models, recording into one real
PostgreSQL. Requests are spread round-robin; each label goes to another replica than
the one that served its request. At ~15% of the traffic the decider is SIGKILLed, at
~50% a non-decider is SIGKILLed and restarted (same replica id), each while labels for
its requests are still to come (they go to the other replicas).

Checked: every acknowledged label is stored and reaches the gates exactly once; the
survivors serve one verdict (abort, on the mobile slice), byte-identical bodies for the
same decision ``seq``; ``mirrorgate replay`` of the recorded pairs reaches the same
verdict; the decider's merge (snapshots + label ledger) equals one engine built the
single proxy's way and fed the union, cell by cell; the evaluation sequence is gap-free
and without duplicates across the takeover; every decision in the decider's state is
stored exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sqlalchemy import text

from gates.records import PairRecord
from proxy.control.engines import new_engine
from proxy.control.replicas import decider_engine
from proxy.core.config import load_config
from proxy.demo.assets import model_path
from proxy.demo.traffic import DemoRequest, LabelBatch, Traffic, scenario
from storage.db import Database
from storage.replicas import ledger_counts, read_decider, replica_snapshots
from storage.store import Store
from tests.replicas.processes import (
    AUTH,
    ROOT,
    TOKEN,
    Replica,
    get_json,
    print_logs,
    ready,
    start_serve,
    stop_all,
    until,
)
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

CONCURRENCY = 4
GATES = {
    # As in tests/proxy/control/test_rollout_online.py: the champion and candidates differ in
    # architecture, so tolerance and per-class recall are evidence; paired accuracy decides.
    "metric": {"accuracy": {"margin": 0.02}, "recall": {"blocking": False}},
    "tolerance": {"blocking": False},
}
ROLLOUT = {
    "stages": [
        {"name": "shadow", "min_pairs": 500, "min_labels": 200, "min_duration_s": 0},
        {"name": "canary", "canary_weight": 0.1, "min_pairs": 500, "min_duration_s": 0},
    ],
    "evaluate_every_pairs": 500,
    "evaluate_every_s": 0.5,
}


def _config(url: str) -> dict[str, Any]:
    def model(name: str) -> dict[str, Any]:
        # generous timeouts: the machine is shared, and a timeout is not what is tested
        return {"name": name, "kind": "onnx", "path": str(model_path(name)), "timeout_ms": 60000}

    return {
        "server": {"model_name": "digits", "control_token": TOKEN, "shutdown_timeout_s": 5},
        "models": {"champion": model("champion"), "candidate": model("candidate_regressed")},
        # Every request mirrored to the end, also after the abort: the test compares the
        # merged state with the whole traffic.
        "mirror": {"timeout_ms": 60000, "shadow_after_abort": True},
        "slices": {"headers": ["platform"]},
        "storage": {"url": url, "flush_interval_ms": 50},
        "gates": GATES,
        "rollout": ROLLOUT,
        "replicas": {"enabled": True, "snapshot_every_s": 0.5, "lease_retry_s": 0.5},
    }


class Driver:
    """Sends the scenario: requests round-robin over the live replicas, labels elsewhere."""

    def __init__(self, session: aiohttp.ClientSession, traffic: Traffic) -> None:
        self.session = session
        self.traffic = traffic
        self.owner: dict[int, Replica] = {}
        self.rows = 0
        self.labels = 0
        self.live: list[Replica] = []
        self.slots = asyncio.Semaphore(CONCURRENCY)

    async def request(self, req: DemoRequest, replica: Replica) -> None:
        async with self.slots:
            async with self.session.post(
                f"{replica.url}/v2/models/digits/infer", json=req.infer_body(), headers=req.headers
            ) as resp:
                assert resp.status == 200, await resp.text()
        self.rows += len(req.pool_rows)

    async def label(self, batch: LabelBatch) -> None:
        # Each label goes to another replica than the one that served its request (as a
        # Service may route it): the replicas' shared labels table must bring it home.
        by_target: dict[str, tuple[Replica, list[dict[str, Any]]]] = {}
        for lab in batch.labels:
            owner = self.owner[lab.request_seq]
            others = [r for r in self.live if r is not owner] or [owner]
            target = others[lab.request_seq % len(others)]
            by_target.setdefault(target.name, (target, []))[1].append(lab.feedback())
        for replica, body in by_target.values():
            async with self.session.post(
                f"{replica.url}/v1/feedback", json=body, headers=AUTH
            ) as resp:
                assert resp.status == 202, await resp.text()
            self.labels += len(body)

    async def run(self, events: list[DemoRequest | LabelBatch], replicas: list[Replica]) -> None:
        self.live = replicas
        k = 0
        sending: list[asyncio.Task[None]] = []
        for ev in events:
            if isinstance(ev, LabelBatch):
                await self.label(ev)  # may overtake its pair: either order joins
            else:
                self.owner[ev.seq] = replicas[k % len(replicas)]
                sending.append(asyncio.create_task(self.request(ev, self.owner[ev.seq])))
                k += 1
                await asyncio.sleep(0)
                while sum(not t.done() for t in sending) >= CONCURRENCY:
                    await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*sending)


def _snapshot_pairs(db: Database, rollout_id: str) -> int:
    return sum(int((s.state or {}).get("pairs", 0)) for s in replica_snapshots(db, rollout_id))


def _stored_pairs(db: Database, rollout_id: str) -> int:
    with db.engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM pairs WHERE rollout_id = :r"), {"r": rollout_id}
        ).scalar()
    return int(n or 0)


def _rollout_id(db: Database) -> str | None:
    rollouts = Store(db).list_rollouts()
    assert len(rollouts) <= 1, "the replicas must share one rollout"
    return rollouts[0].id if rollouts else None


async def _deciders(session: aiohttp.ClientSession, replicas: list[Replica]) -> list[Replica]:
    statuses = [await get_json(session, f"{r.url}/v1/rollout") for r in replicas]
    return [r for r, s in zip(replicas, statuses, strict=True) if s["replica"]["decider"]]


async def test_three_replicas_one_decision_through_kills_and_a_restart(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """SIGKILL of the decider (at ~15% of the traffic), then SIGKILL and restart of a
    non-decider (at ~50%), each while labels for its requests are still to come: those
    labels are posted to the other replicas and must all reach the gates."""
    url = pg_server.create_database("replicas")
    config_path = tmp_path / "mirrorgate.yaml"
    config_path.write_text(yaml.safe_dump(_config(url)))
    db = Database(url)
    replicas: list[Replica] = []
    try:
        # Started together: the schema is created once (under an advisory lock).
        replicas += await asyncio.gather(*(start_serve(f"r{i}", config_path) for i in range(3)))
        traffic = Traffic(scenario("fast", id_prefix="rep"))
        events = list(traffic.events())

        def cut_at(seq: int) -> int:
            return next(
                i for i, ev in enumerate(events) if isinstance(ev, DemoRequest) and ev.seq == seq
            )

        cut1, cut2 = cut_at(225), cut_at(750)
        async with aiohttp.ClientSession() as session:
            for r in replicas:
                await until(lambda r=r: ready(session, r), f"{r.name} ready", timeout_s=120)
            driver = Driver(session, traffic)
            await driver.run(events[:cut1], replicas)
            rollout_id = await until(
                lambda: asyncio.to_thread(_rollout_id, db), "the shared rollout"
            )

            async def recorded() -> bool:
                # Every pair sent is stored and in its replica's snapshot: the kill below
                # then tests the labels still to come, not the documented windows of
                # the recorder's buffer and of the last snapshot.
                def both() -> bool:
                    return (
                        _stored_pairs(db, rollout_id) == driver.rows
                        and _snapshot_pairs(db, rollout_id) == driver.rows
                    )

                return await asyncio.to_thread(both)

            await until(recorded, "every pair stored and snapshotted")
            (victim,) = await until(
                lambda: _one(_deciders(session, replicas)), "exactly one decider"
            )
            seq_before = read_decider(db, rollout_id)
            assert seq_before is not None and seq_before["by"] == victim.name
            # mid-rollout: nothing decided yet (the abort needs several times this evidence)
            assert seq_before["evaluation"]["verdict"] == "continue", seq_before["evaluation"]
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
            live = [r for r in replicas if r is not victim]

            # The next part over the survivors; labels of the victim's requests too.
            await driver.run(events[cut1:cut2], live)
            await until(recorded, "every pair stored and snapshotted")
            (leader,) = await until(lambda: _one(_deciders(session, live)), "one decider")
            assert leader is not victim
            follower = next(r for r in live if r is not leader)
            follower.proc.send_signal(signal.SIGKILL)  # a non-decider this time
            await follower.proc.wait()
            # ... and its container restarts in its pod (same replica id)
            restarted = await start_serve(follower.name, config_path)
            replicas.append(restarted)
            await until(lambda: ready(session, restarted), "the restart ready", 120)
            survivors = [leader, restarted]
            await driver.run(events[cut2:], survivors)
            assert driver.labels == len(traffic.labels())  # every label acknowledged

            # The decider's latest evaluation saw every pair and every label, and both
            # survivors serve that very decision (same seq: identical bodies).
            seen: dict[str, Any] = {}

            async def settled() -> Any:
                state = read_decider(db, rollout_id)
                if state is None or state["by"] == victim.name:
                    return None
                ev = state["evaluation"]
                seen["decider"] = (ev["pairs"], ev["labels"], driver.rows, driver.labels)
                seen["ledger"] = ledger_counts(db, rollout_id)
                with db.engine.connect() as conn:
                    seen["labels"] = conn.execute(
                        text("SELECT status, count(*) FROM labels GROUP BY 1")
                    ).all()
                if (ev["pairs"], ev["labels"]) != (driver.rows, driver.labels):
                    return None
                bodies = [await get_json(session, f"{r.url}/v1/rollout/verdict") for r in survivors]
                seen["bodies"] = bodies
                if any((b["pairs"], b["labels"]) != (driver.rows, driver.labels) for b in bodies):
                    return None
                if bodies[0]["seq"] != bodies[1]["seq"]:
                    return None  # one of them has not adopted the latest step yet
                return state, bodies

            try:
                state, bodies = await until(settled, "the decider's verdict on all traffic")
            except AssertionError:
                print("last seen:", seen)
                raise
            assert bodies[0] == bodies[1]
            verdict = bodies[0]
            assert verdict["verdict"] == "abort", verdict
            assert any("platform=mobile" in f for f in verdict["failing"]), verdict
            assert verdict["canary_weight"] == 0.0
            for r in survivors:
                full = await get_json(session, f"{r.url}/v1/rollout")
                assert full["verdict"] == "abort" and full["canary_weight"] == 0.0
                assert full["queues"]["labels_unmatched"] == 0
                async with session.get(f"{r.url}/metrics") as resp:
                    metrics = await resp.text()
                assert 'mirrorgate_rollout_verdict{verdict="abort"} 1.0' in metrics
                assert "mirrorgate_rollout_canary_weight 0.0" in metrics

        # The survivors stop (SIGTERM: last snapshot, last step); the final record is read.
        for r in survivors:
            r.proc.send_signal(signal.SIGTERM)
        for r in survivors:
            assert await asyncio.wait_for(r.proc.wait(), 60) == 0
        state = read_decider(db, rollout_id)
        assert state is not None and state["by"] != victim.name

        # Every acknowledged label is stored, joined, and fed to the gates exactly once.
        with db.engine.connect() as conn:
            by_status = dict(
                conn.execute(text("SELECT status, count(*) FROM labels GROUP BY 1")).all()
            )
        assert by_status == {"joined": driver.labels}
        assert ledger_counts(db, rollout_id) == {"gated": driver.labels, "waiting": 0}
        assert state["evaluation"]["labels"] == driver.labels

        # No evaluation lost or doubled: seq 1..N, each once (one row per gate cell),
        # the victim's before the takeover and the survivor's after.
        with db.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT (details->>'seq')::int AS seq, details->>'by' AS by, "
                    "count(*) AS n, count(DISTINCT gate || '|' || slice) AS cells "
                    "FROM gate_evaluations WHERE rollout_id = :r GROUP BY 1, 2 ORDER BY 1"
                ),
                {"r": rollout_id},
            ).all()
        seqs = [r.seq for r in rows]
        assert seqs == list(range(1, state["seq"] + 1)), seqs  # contiguous, none twice
        assert all(r.n == r.cells for r in rows)  # each cell once per evaluation
        owners = [r.by for r in rows]
        switch = owners.index(leader.name)
        assert set(owners[:switch]) == {victim.name}, owners
        assert switch >= seq_before["seq"]

        # Every decision the decider's state holds is stored once, in order.
        stored = Store(db).decisions(rollout_id)
        engine_decisions = state["engine"]["decisions"]
        assert [(d.reason, d.ts) for d in stored] == [(d["why"], d["ts"]) for d in engine_decisions]
        (abort,) = [d for d in stored if d.verdict == "abort"]
        assert abort.evidence is not None
        assert abort.evidence["pairs"] > seq_before["evaluation"]["pairs"]  # after the takeover
        assert Store(db).get_rollout(rollout_id).status == "aborted"

        # The decider's merge (every snapshot, both lives of the restarted replica, and
        # the label ledger) is one engine, built the single proxy's way, fed the union.
        config = load_config(config_path, env={})
        snaps = replica_snapshots(db, rollout_id)
        assert {s.replica_id for s in snaps} == {"r0", "r1", "r2"}
        assert len(snaps) == 4  # the restarted replica's earlier life still counts
        pairs = list(Store(db).iter_pairs(rollout_id))
        assert len(pairs) == driver.rows
        labels = {lab.id: lab.label for lab in traffic.labels()}
        merged = decider_engine(config, state, snaps, start_ts=0.0)
        union = new_engine(config, start_ts=0.0)
        union.observe([_unlabelled(p) for p in pairs])
        union.observe_labelled([_with_label(p, labels[p.id]) for p in pairs if p.id in labels])
        assert (merged.pairs, merged.labels) == (union.pairs, union.labels)
        assert (union.pairs, union.labels) == (driver.rows, driver.labels)
        # Input drift is the exception (docs/replicas.md): its automatic reference is
        # each replica's first pairs, so no union exists; it is a non-blocking warning.
        got = {(g.name, g.slice): g for g in merged.results() if not _input_drift(g.name)}
        want = {(g.name, g.slice): g for g in union.results() if not _input_drift(g.name)}
        assert len(want) > 10
        assert got.keys() == want.keys()
        for key, g in want.items():
            assert got[key].n == g.n, key
            assert got[key].status == g.status, key
            if g.statistic is not None:
                assert got[key].statistic == pytest.approx(g.statistic, rel=1e-9, abs=1e-12), key

        # mirrorgate replay of the recorded pairs reaches the same verdict.
        pairs_file = tmp_path / "pairs.jsonl"
        labels_file = tmp_path / "labels.jsonl"
        pairs_file.write_text("".join(json.dumps(_unlabelled(p).to_dict()) + "\n" for p in pairs))
        labels_file.write_text(
            "".join(json.dumps({"id": k, "label": v}) + "\n" for k, v in labels.items())
        )
        gates_file = tmp_path / "gates.yaml"
        gates_file.write_text(
            yaml.safe_dump(
                {"gates": GATES, "rollout": ROLLOUT, "slices": {"headers": ["platform"]}}
            )
        )
        replay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "replay",
            "--config",
            str(gates_file),
            "--pairs",
            str(pairs_file),
            "--labels",
            str(labels_file),
            "--json",
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await replay.communicate()
        assert replay.returncode == 1  # abort
        replayed = json.loads(out)
        assert replayed["verdict"] == verdict["verdict"] == "abort"
        replay_failing = {
            f"{g['name']}[{g['slice']}]"
            for g in replayed["gates"]
            if g["status"] == "FAIL" and g["blocking"]
        }
        assert any("platform=mobile" in f for f in replay_failing), replay_failing
    except BaseException:
        print_logs(tmp_path, replicas)
        raise
    finally:
        await stop_all(replicas)
        db.dispose()


async def _one(items: Any) -> Any:
    got = await items
    return got if len(got) == 1 else None


def _unlabelled(p: PairRecord) -> PairRecord:
    import dataclasses

    return dataclasses.replace(p, label=None)


def _with_label(p: PairRecord, label: Any) -> PairRecord:
    import dataclasses

    return dataclasses.replace(p, label=label)


def _input_drift(name: str) -> bool:
    return name.startswith("drift.input")
