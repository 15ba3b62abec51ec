"""The parts of several-replica decisions, each on its own (fast, in-process).

* ``merged_engine``: the merge of replicas' cumulative snapshots continues the decider's
  stage machine, and equals one engine fed the union of their traffic;
* ``evaluation_from_dict``: followers serve the decider's evaluation unchanged;
* the decider lease on a real PostgreSQL: one holder, released when its session dies;
* ``decider_step``: all or nothing, and steps serialise on the decider row;
* configuration: replicas need storage, PostgreSQL, and do not change the rollout digest.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text

from gates.engine import RolloutEngine
from gates.records import PairRecord
from gates.settings import GatesSettings, RolloutSettings
from proxy.control.replicas import control_state, evaluation_from_dict, json_safe, merged_engine
from proxy.core.config import load_config
from proxy.core.errors import ConfigError
from proxy.server.app import create_app
from storage.db import Database
from storage.entities import GateSnapshot, ModelInfo
from storage.errors import StorageError
from storage.migrate import upgrade
from storage.replicas import (
    DeciderLease,
    LeaseLost,
    StepWrite,
    read_decider,
    replica_snapshots,
    require_postgres,
    run_step,
)
from storage.schema import GateEvaluationRow
from storage.store import Store
from tests.gates.conftest import classification_records
from tests.support.postgres import PostgresServer

GATES = GatesSettings.model_validate({"drift": {"input": {"enabled": False}}})
PLAN = RolloutSettings.model_validate(
    {
        "stages": [
            {"name": "shadow", "min_pairs": 300, "min_duration_s": 0, "require": []},
            {"name": "canary", "canary_weight": 0.2, "min_pairs": 300, "min_duration_s": 0},
        ],
        "evaluate_every_pairs": 100,
    }
)


def _feed(engine: RolloutEngine, records: list[PairRecord]) -> None:
    engine.observe([dataclasses.replace(r, label=None) for r in records])
    engine.observe_labelled([r for r in records if r.label is not None])


def _snapshot(name: str, records: list[PairRecord]) -> GateSnapshot:
    local = RolloutEngine(GATES, PLAN, task="classification", start_ts=0.0)
    _feed(local, records)
    # through JSON, as the database stores it
    state = json.loads(json.dumps(json_safe(local.state_dict())))
    return GateSnapshot("r", name, 0.0, 1.0, state, 1.0)


def _merged(decider: dict[str, Any] | None, snaps: list[GateSnapshot]) -> RolloutEngine:
    return merged_engine(
        decider, snaps, gates=GATES, plan=PLAN, task="classification", start_ts=0.0
    )


def test_merged_snapshots_equal_one_engine_on_the_union() -> None:
    records = classification_records(900, seed=7)
    parts = [records[0::3], records[1::3], records[2::3]]
    merged = _merged(None, [_snapshot(f"r{i}", p) for i, p in enumerate(parts)])
    union = RolloutEngine(GATES, PLAN, task="classification", start_ts=0.0)
    _feed(union, records)
    assert (merged.pairs, merged.labels) == (union.pairs, union.labels) == (900, 900)
    got = {(g.name, g.slice): g for g in merged.results()}
    want = {(g.name, g.slice): g for g in union.results()}
    assert got.keys() == want.keys() and len(want) > 5
    for key, g in want.items():
        assert (got[key].n, got[key].status) == (g.n, g.status), key
        if g.statistic is not None:
            assert got[key].statistic == pytest.approx(g.statistic, rel=1e-9, abs=1e-12)
    # and the decision on it is the same
    assert merged.evaluate(1.0).verdict == union.evaluate(1.0).verdict


def test_the_decider_state_carries_the_stage_machine_over_fresh_snapshots() -> None:
    records = classification_records(1200, seed=3)
    first = [_snapshot("a", records[:200]), _snapshot("b", records[200:400])]
    engine = _merged(None, first)
    ev = engine.evaluate(1.0)
    assert ev.decision is not None and ev.decision.action == "advance", ev.reason
    decider = {"engine": json.loads(json.dumps(control_state(engine)))}
    # later, the cumulative snapshots have grown; the stage counts start at the advance
    later = [_snapshot("a", records[:300]), _snapshot("b", records[200:500])]
    again = _merged(decider, later)
    assert again.stage.name == "canary"
    assert (again.pairs, again.stage_pairs) == (600, 200)
    assert [d.action for d in again.decisions] == ["advance"]


def test_followers_serve_the_deciders_evaluation_unchanged() -> None:
    engine = _merged(None, [_snapshot("a", classification_records(400, seed=5))])
    ev = engine.evaluate(2.0)
    stored = json.loads(json.dumps(json_safe(ev.to_dict())))
    back = evaluation_from_dict(stored)
    assert json_safe(back.to_dict()) == stored
    assert back.verdict_dict() == json_safe(ev.verdict_dict())
    assert back.metric_samples() == ev.metric_samples()


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg_url(pg_server: PostgresServer) -> str:
    url = pg_server.create_database("lease")
    db = Database(url)
    upgrade(db)
    db.dispose()
    return url


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture
def rollout_id(db: Database) -> str:
    return Store(db).create_rollout(ModelInfo("m", "onnx", "d1")).id


@pytest.mark.postgres
def test_one_lease_holder_and_takeover_when_its_session_dies(db: Database, rollout_id: str) -> None:
    a, b = DeciderLease(db, "x", rollout_id), DeciderLease(db, "x", rollout_id)
    other_rollout = DeciderLease(db, "x", rollout_id + "-other")
    try:
        assert a.try_acquire()
        assert not b.try_acquire()
        assert other_rollout.try_acquire()  # leases are per rollout
        assert a.try_acquire()  # re-entrant for its holder: it checks its session
        # The holder's session dies (what a SIGKILL does to its socket).
        assert a._conn is not None
        a._conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
        assert not a.check() and not a.held
        assert b.try_acquire()
        with pytest.raises(StorageError, match="not held"):
            a.step(rollout_id, lambda s, snaps, labelled: None)
    finally:
        for lease in (a, b, other_rollout):
            lease.release()


def _terminate(db: Database, pid: int) -> None:
    with db.engine.begin() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


@pytest.mark.postgres
def test_a_lease_whose_session_was_terminated_is_lost_and_fenced(
    db: Database, rollout_id: str
) -> None:
    """pg_terminate_backend on the lock holder: the driver reconnects the lease's
    connection transparently, but the new session holds no lock. The holder finds out
    at its next check or step (which writes nothing), and exactly one lease holds."""
    a, b = DeciderLease(db, "x", rollout_id), DeciderLease(db, "x", rollout_id)
    writes: list[int] = []

    def write(state: Any, snaps: Any, labelled: Any) -> StepWrite:
        writes.append(1)
        return StepWrite(state={"seq": len(writes)})

    try:
        assert a.try_acquire() and a.backend_pid is not None
        assert a.step(rollout_id, write).written
        _terminate(db, a.backend_pid)
        assert b.try_acquire()  # the lock went with the session
        # The step reconnects under the hood; the fence refuses it and nothing is written.
        with pytest.raises(LeaseLost):
            a.step(rollout_id, write)
        assert not a.held and a.lost == 1 and writes == [1]
        assert not a.try_acquire()  # b holds it: exactly one decider
        assert [lease.held for lease in (a, b)] == [False, True]
        assert b.step(rollout_id, write).written
        # The same through check(): terminate b, check() reconnects and says no.
        assert b.backend_pid is not None
        _terminate(db, b.backend_pid)
        assert not b.check() and not b.held
        assert a.try_acquire()
    finally:
        for lease in (a, b):
            lease.release()


@pytest.mark.postgres
def test_a_step_writes_everything_or_nothing(db: Database, rollout_id: str) -> None:
    from storage.entities import Decision

    def failing(state: Any, snaps: Any, labelled: Any) -> StepWrite:
        raise RuntimeError("crash in the middle of a step")

    with pytest.raises(RuntimeError):
        run_step(db, rollout_id, failing)
    assert read_decider(db, rollout_id) is None
    assert run_step(db, rollout_id, lambda s, snaps, labelled: None).written is False

    def good(state: Any, snaps: Any, labelled: Any) -> StepWrite:
        seq = (state or {}).get("seq", 0) + 1
        return StepWrite(
            state={"seq": seq},
            evaluations=[_row(seq)],
            decisions=[Decision("abort", "engine", "engine", "why", ts=1.0)],
            stage="canary",
            verdict="abort",
        )

    assert run_step(db, rollout_id, good).written
    assert read_decider(db, rollout_id) == {"seq": 1}
    store = Store(db)
    assert [d.verdict for d in store.decisions(rollout_id)] == ["abort"]
    assert store.get_rollout(rollout_id).status == "aborted"
    assert store.get_rollout(rollout_id).stage == "canary"
    # the decider row is not a replica snapshot
    assert replica_snapshots(db, rollout_id) == []


@pytest.mark.postgres
def test_concurrent_steps_serialise_on_the_decider_row(db: Database, rollout_id: str) -> None:
    def bump(state: Any, snaps: Any, labelled: Any) -> StepWrite:
        seq = (state or {}).get("seq", 0) + 1
        return StepWrite(
            state={"seq": seq},
            evaluations=[_row(seq)],
        )

    threads = [
        threading.Thread(target=lambda: [run_step(db, rollout_id, bump) for _ in range(10)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_decider(db, rollout_id) == {"seq": 40}
    with db.engine.connect() as conn:
        ns = conn.execute(
            select(GateEvaluationRow.n, func.count())
            .where(GateEvaluationRow.rollout_id == rollout_id)
            .group_by(GateEvaluationRow.n)
        ).all()
    assert sorted(n for n, c in ns if c == 1) == list(range(1, 41))  # none lost, none twice


def _row(n: int) -> Any:
    from storage.entities import GateEvaluation

    return GateEvaluation("g", "pass", 0.0, 1.0, n, "m", ts=1.0)


# ---------------------------------------------------------------------- configuration


def _config(**replicas: Any) -> Any:
    return load_config(
        data={
            "models": {"champion": {"name": "c", "kind": "onnx", "path": "/nonexistent.onnx"}},
            "replicas": replicas,
        },
        env={},
    )


def test_replicas_do_not_change_the_rollout_digest() -> None:
    assert _config(enabled=True, replica_id="a").digest() == _config(replica_id="b").digest()


def test_replicas_need_storage_and_postgresql(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="storage"):
        create_app(_config(enabled=True))
    with pytest.raises(StorageError, match="PostgreSQL"):
        require_postgres(Database(f"sqlite:///{tmp_path}/x.sqlite"))


def test_replica_id_defaults_to_host_and_pid() -> None:
    import os
    import socket

    assert _config().replicas.resolved_id() == f"{socket.gethostname()}-{os.getpid()}"
    assert _config(replica_id="pod-1").replicas.resolved_id() == "pod-1"
