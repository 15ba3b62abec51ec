"""One proxy against three replicas, as real processes: the same decision at the same look.

The demo's seeded traffic (its real ONNX champion and the regressed candidate, worse on
platform=mobile) goes (a) through one ``mirrorgate serve`` process and (b) round-robin
through three replica ``serve`` processes on one real PostgreSQL, each label posted to
another replica than the one that served its request. Both must abort, on the same
cell, at the same evaluation: the replicas' decision point (pairs and labels when they
decided) is the single proxy's, so well within one snapshot period of traffic.

Deterministic on a loaded machine, by construction rather than by timing: the traffic
goes in lockstep steps of exactly ``rollout.evaluate_every_pairs`` pairs (requests of
eight rows each), the only cadence that evaluates (``evaluate_every_s`` is out of
reach). In each step the labels of the previous step's requests are posted first and
the test waits until they reached the gates (a single proxy joins them before its 202;
for the replicas, the decider's ledger has fed them: ``ledger_counts``); then the step's
requests are sent and the test waits for the evaluation that counts them (the single
proxy's served evaluation; the decider's stored one). A partial step never evaluates:
the merged pair count reaches the next multiple of the cadence only when every
replica's snapshot holds the whole step. So both systems look at the very same pairs
and labels, at every look, and the test compares every look, not only the last.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from sqlalchemy import text

from proxy.control.engines import new_engine
from proxy.control.replicas import evaluation_from_dict
from proxy.core.config import load_config
from proxy.demo.assets import model_path
from proxy.demo.offline import OfflineModel
from proxy.demo.recorded import iter_pair_records
from proxy.demo.traffic import DemoLabel, DemoRequest, Traffic, scenario
from storage.db import Database
from storage.replicas import ledger_counts, read_decider
from storage.store import Store
from tests.replicas.processes import (
    AUTH,
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

ROWS = 8  # rows per request: every step is exactly STEP_PAIRS pairs
STEP_REQUESTS = 50
STEP_PAIRS = ROWS * STEP_REQUESTS  # = rollout.evaluate_every_pairs: one look per step
SNAPSHOT_S = 0.2
CONCURRENCY = 4
GATES = {
    # As in test_replicas.py: paired accuracy on labels decides; the pairs' own evidence
    # (tolerance, recall, latency: timing differs between runs) is reported, not blocking.
    "metric": {"accuracy": {"margin": 0.02}, "recall": {"blocking": False}},
    "tolerance": {"blocking": False},
    "latency": {"blocking": False},
}
ROLLOUT = {
    # one long stage: the abort is what is compared, and no canary reroutes requests
    "stages": [{"name": "shadow", "min_pairs": 10_000_000, "min_duration_s": 0}],
    "evaluate_every_pairs": STEP_PAIRS,
    "evaluate_every_s": 1e9,  # never by time: every look is a step boundary
}


def _config(url: str, *, replicas: bool) -> dict[str, Any]:
    def model(name: str) -> dict[str, Any]:
        return {"name": name, "kind": "onnx", "path": str(model_path(name)), "timeout_ms": 60000}

    return {
        "server": {"model_name": "digits", "control_token": TOKEN, "shutdown_timeout_s": 5},
        "models": {"champion": model("champion"), "candidate": model("candidate_regressed")},
        "mirror": {"timeout_ms": 60000},
        "slices": {"headers": ["platform"]},
        "storage": {"url": url, "flush_interval_ms": 50},
        "gates": GATES,
        "rollout": ROLLOUT,
        "replicas": {"enabled": replicas, "snapshot_every_s": SNAPSHOT_S, "lease_retry_s": 0.2},
    }


@dataclasses.dataclass(frozen=True)
class Look:
    """What one evaluation said: the comparison's unit."""

    pairs: int
    labels: int
    verdict: str
    failing: tuple[str, ...]

    @classmethod
    def of(cls, body: dict[str, Any]) -> Look:
        return cls(body["pairs"], body["labels"], body["verdict"], tuple(sorted(body["failing"])))


class System:
    """One way of serving the traffic: one proxy, or replicas (requests round-robin)."""

    def __init__(self, session: aiohttp.ClientSession, processes: list[Replica], url: str):
        self.session = session
        self.processes = processes
        self.db = Database(url)
        self.owner: dict[int, Replica] = {}
        self.labels_sent = 0
        self.slots = asyncio.Semaphore(CONCURRENCY)

    @property
    def replicated(self) -> bool:
        return len(self.processes) > 1

    def rollout_id(self) -> str:
        (rollout,) = Store(self.db).list_rollouts()
        return rollout.id

    async def request(self, req: DemoRequest) -> None:
        replica = self.processes[req.seq % len(self.processes)]
        self.owner[req.seq] = replica
        async with (
            self.slots,
            self.session.post(
                f"{replica.url}/v2/models/digits/infer", json=req.infer_body(), headers=req.headers
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def send(self, requests: list[DemoRequest]) -> None:
        await asyncio.gather(*(self.request(r) for r in requests))

    async def label(self, labels: list[DemoLabel]) -> None:
        """Post the labels and wait until they reached the gates."""
        by_target: dict[str, tuple[Replica, list[dict[str, Any]]]] = {}
        for lab in labels:
            owner = self.owner[lab.request_seq]
            # another replica than the one that served the request (one proxy: itself)
            others = [r for r in self.processes if r is not owner] or [owner]
            target = others[lab.request_seq % len(others)]
            by_target.setdefault(target.name, (target, []))[1].append(lab.feedback())
        for target, body in by_target.values():
            async with self.session.post(
                f"{target.url}/v1/feedback", json=body, headers=AUTH
            ) as resp:
                assert resp.status == 202, await resp.text()
                answer = await resp.json()
            if not self.replicated:
                # a single proxy joins them in its gates before the 202 (pairs all seen)
                assert answer["joined"] == len(body), answer
        self.labels_sent += len(labels)
        if self.replicated:
            rid = await asyncio.to_thread(self.rollout_id)
            want = {"gated": self.labels_sent, "waiting": 0}

            async def gated() -> bool:
                return await asyncio.to_thread(ledger_counts, self.db, rid) == want

            await until(gated, f"{self.labels_sent} labels fed to the gates by the decider")

    async def look_at(self, pairs: int) -> Look:
        """The evaluation that counts exactly ``pairs`` pairs (waits for it)."""
        if self.replicated:
            rid = await asyncio.to_thread(self.rollout_id)

            async def decided() -> Any:
                state = await asyncio.to_thread(read_decider, self.db, rid)
                ev = (state or {}).get("evaluation")
                if not ev or ev["pairs"] < pairs:
                    return None
                return evaluation_from_dict(ev).verdict_dict()

            body = await until(decided, f"the decider's evaluation at {pairs} pairs")
        else:
            url = f"{self.processes[0].url}/v1/rollout/verdict"

            async def served() -> Any:
                got = await get_json(self.session, url)
                return got if got["pairs"] >= pairs else None

            body = await until(served, f"the proxy's evaluation at {pairs} pairs")
        look = Look.of(body)
        assert look.pairs == pairs, look  # never a look at a partial step
        return look


def _replay(
    config_path: Path,
    traffic: Traffic,
    steps: list[list[DemoRequest]],
    labels_of: dict[int, list[DemoLabel]],
) -> list[Look]:
    """The looks of one in-process engine fed the same lockstep steps (the oracle)."""
    config = load_config(config_path, env={})
    engine = new_engine(config, start_ts=0.0)
    models = (OfflineModel(model_path("champion")), OfflineModel(model_path("candidate_regressed")))
    pairs = {r.id: r for r in iter_pair_records(traffic, *models, include_features=False)}
    looks: list[Look] = []
    previous: list[DemoRequest] = []
    for step in steps:
        engine.observe_labelled(
            [
                dataclasses.replace(pairs[lab.id], label=lab.label)
                for req in previous
                for lab in labels_of[req.seq]
            ]
        )
        engine.observe([pairs[rid] for req in step for rid in req.record_ids])
        assert engine.due(0.0)
        looks.append(Look.of(engine.evaluate(0.0).verdict_dict()))
        if looks[-1].verdict != "continue":
            break
        previous = step
    return looks


def _evaluations(db: Database, rollout_id: str) -> int:
    with db.engine.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(DISTINCT (details->>'seq')::int) FROM gate_evaluations "
                "WHERE rollout_id = :r"
            ),
            {"r": rollout_id},
        ).scalar()
    return int(n or 0)


async def test_one_proxy_and_three_replicas_decide_at_the_same_evaluation(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    single_url = pg_server.create_database("one_proxy")
    fleet_url = pg_server.create_database("three_replicas")
    (tmp_path / "single").mkdir()
    (tmp_path / "fleet").mkdir()
    single_cfg = tmp_path / "single" / "mirrorgate.yaml"
    fleet_cfg = tmp_path / "fleet" / "mirrorgate.yaml"
    single_cfg.write_text(yaml.safe_dump(_config(single_url, replicas=False)))
    fleet_cfg.write_text(yaml.safe_dump(_config(fleet_url, replicas=True)))

    settings = dataclasses.replace(scenario("fast", id_prefix="same"), rows_per_request={ROWS: 1})
    traffic = Traffic(settings)
    requests = list(traffic.requests())
    labels_of: dict[int, list[DemoLabel]] = defaultdict(list)
    for lab in traffic.labels():
        labels_of[lab.request_seq].append(lab)
    steps = [
        requests[i : i + STEP_REQUESTS]
        for i in range(0, len(requests) - STEP_REQUESTS + 1, STEP_REQUESTS)
    ]

    processes: list[Replica] = []
    systems: list[System] = []
    try:
        processes += await asyncio.gather(
            start_serve("one", single_cfg), *(start_serve(f"r{i}", fleet_cfg) for i in range(3))
        )
        async with aiohttp.ClientSession() as session:
            for p in processes:
                await until(lambda p=p: ready(session, p), f"{p.name} ready", timeout_s=120)
            single = System(session, processes[:1], single_url)
            fleet = System(session, processes[1:], fleet_url)
            systems += [single, fleet]

            looks: list[tuple[Look, Look]] = []
            previous: list[DemoRequest] = []
            for k, step in enumerate(steps):
                late = [lab for req in previous for lab in labels_of[req.seq]]
                if late:
                    await asyncio.gather(single.label(late), fleet.label(late))
                await asyncio.gather(single.send(step), fleet.send(step))
                at = (k + 1) * STEP_PAIRS
                one, many = await asyncio.gather(single.look_at(at), fleet.look_at(at))
                looks.append((one, many))
                # the same pairs and labels, hence the same gates' verdict at every look
                assert many == one, (k, looks)
                if one.verdict != "continue":
                    break
                previous = step

            one, many = looks[-1]
            assert one.verdict == "abort", looks  # the test needs a decision to compare
            assert any("platform=mobile" in f for f in one.failing), one
            assert len(looks) > 2, looks  # decided on the way, not at the first look

            # Every replica serves that decision (the shared one: identical bodies).
            async def served_by_all() -> Any:
                bodies = [await get_json(session, f"{p.url}/v1/rollout/verdict") for p in processes]
                return bodies if all(b["verdict"] == "abort" for b in bodies) else None

            bodies = await until(served_by_all, "every process serving the abort")
            assert {Look.of(b) for b in bodies} == {one}
            assert len({b["seq"] for b in bodies[1:]}) == 1
            assert all(b["canary_weight"] == 0.0 for b in bodies)

        # The stored decisions: one abort each, on the same pairs and labels (the
        # decision point), and one stored evaluation per look in the replicas' sequence.
        stored: list[tuple[int, int]] = []
        for system in systems:
            rid = system.rollout_id()
            (abort,) = [d for d in Store(system.db).decisions(rid) if d.verdict == "abort"]
            assert abort.evidence is not None
            stored.append((abort.evidence["pairs"], abort.evidence["labels"]))
        assert stored[0] == stored[1] == (one.pairs, one.labels)
        assert _evaluations(fleet.db, fleet.rollout_id()) == len(looks)

        # And both are what the gates say on these pairs in-process: an engine built by
        # the one factory, fed the same steps from the same ONNX models offline.
        replayed = await asyncio.to_thread(_replay, single_cfg, traffic, steps, labels_of)
        assert replayed == [o for o, _ in looks]
    except BaseException:
        print_logs(tmp_path / "single", processes[:1])
        print_logs(tmp_path / "fleet", processes[1:])
        raise
    finally:
        await stop_all(processes)
        for system in systems:
            system.db.dispose()
