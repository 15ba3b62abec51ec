"""Several replicas, one decision: the decider lease and the decider's atomic step.

The SQL half of ``proxy/replicas.py`` (docs/replicas.md):

* :class:`DeciderLease` — a PostgreSQL *session* advisory lock
  (``pg_try_advisory_lock``) held on one dedicated connection. A replica that dies (even
  by SIGKILL) closes its socket; PostgreSQL ends the session and frees the lock, so a
  follower takes it on its next try. The lease's connection also runs the decider's
  writes, which fences them: when the session is gone, so are the lock and the writes.
* :func:`decider_step` — ONE transaction: lock the rollout's decider row
  (``SELECT ... FOR UPDATE``: the periodic decider and an operator's manual action on
  any replica serialise there), read every replica's gate snapshot, let the caller
  evaluate, then write the evaluation rows, the decisions, the rollout's stage/status
  and the new decider state together. A crash before the commit writes nothing; after
  it, everything — so no evaluation is lost or written twice across a takeover.

The decider's state lives in ``gate_snapshots`` under the reserved replica id
:data:`DECIDER_ID` (window_start 0): no schema change, purged by the same retention
(its ``window_end`` moves with every step, so an active rollout's row stays young).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import SQLAlchemyError

from storage.db import Database
from storage.entities import Decision, GateEvaluation, GateSnapshot
from storage.errors import StorageError
from storage.schema import (
    DecisionRow,
    GateEvaluationRow,
    GateSnapshotRow,
    LabelRow,
    RolloutRow,
)

DECIDER_ID = "__decider__"
# A single proxy's resume state (proxy/persistence.py): never a replica's evidence, even
# when the same rollout later runs with replicas.enabled.
RESUME_ID = "__resume__"
_FINAL = {"promote": "promoted", "abort": "aborted"}


def lock_key(name: str, rollout_id: str) -> int:
    """A signed 64-bit advisory-lock key from the lease name and the rollout."""
    digest = hashlib.sha256(f"{name}|{rollout_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def require_postgres(db: Database) -> None:
    if db.dialect != "postgresql":
        raise StorageError(
            f"several replicas need PostgreSQL (advisory locks); storage is {db.display_url}"
        )


class DeciderLease:
    """The decider lease: a session advisory lock on a dedicated connection.

    Blocking calls (run them in a thread). Not thread-safe: one owner task.
    """

    def __init__(self, db: Database, name: str, rollout_id: str) -> None:
        require_postgres(db)
        self.db = db
        self.key = lock_key(name, rollout_id)
        self._conn: Connection | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def try_acquire(self) -> bool:
        """Take the lease if free (never waits). True when this replica holds it."""
        if self._conn is not None:
            return self.check()
        try:
            conn = self.db.engine.connect()
        except SQLAlchemyError as exc:
            raise StorageError(f"decider lease: cannot connect: {exc}") from exc
        try:
            with conn.begin():
                got = bool(
                    conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
                )
        except SQLAlchemyError as exc:
            conn.invalidate()
            conn.close()
            raise StorageError(f"decider lease: {exc}") from exc
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def check(self) -> bool:
        """Is the session (hence the lock) still alive? Drops the lease when not."""
        if self._conn is None:
            return False
        try:
            with self._conn.begin():
                self._conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            self._lost()
            return False

    def step(self, rollout_id: str, decide: StepFn, *, now: float | None = None) -> StepResult:
        """:func:`decider_step` on the lease's own session (fenced by the lock)."""
        if self._conn is None:
            raise StorageError("decider lease not held")
        try:
            return decider_step(self._conn, rollout_id, decide, now=now)
        except StorageError:
            if not self.check():
                raise StorageError("decider lease lost during a step") from None
            raise

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            with conn.begin():
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        except SQLAlchemyError:
            conn.invalidate()  # the session ends with the socket: the lock goes with it
        finally:
            conn.close()

    def _lost(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except SQLAlchemyError:
                pass


@dataclass
class StepWrite:
    """What one decider step writes (all in the step's transaction)."""

    state: dict[str, Any]
    evaluations: Sequence[GateEvaluation] = ()
    decisions: Sequence[Decision] = ()
    stage: str | None = None
    verdict: str | None = None  # promote / abort end the rollout row
    result: Any = None  # handed back to the caller untouched


@dataclass
class StepResult:
    state: dict[str, Any] | None
    written: bool
    result: Any = None
    snapshots: list[GateSnapshot] = field(default_factory=list)


# decide(decider state or None, replica snapshots) -> what to write, or None for nothing
StepFn = Callable[[dict[str, Any] | None, list[GateSnapshot]], StepWrite | None]


def decider_step(
    conn: Connection, rollout_id: str, decide: StepFn, *, now: float | None = None
) -> StepResult:
    ts = time.time() if now is None else now
    t = GateSnapshotRow
    try:
        with conn.begin():
            conn.execute(
                postgresql.insert(t)
                .values(
                    rollout_id=rollout_id,
                    replica_id=DECIDER_ID,
                    window_start=0.0,
                    window_end=ts,
                    state=None,
                    ts=ts,
                )
                .on_conflict_do_nothing(index_elements=["rollout_id", "replica_id", "window_start"])
            )
            row = conn.execute(
                select(t.id, t.state)
                .where(
                    t.rollout_id == rollout_id, t.replica_id == DECIDER_ID, t.window_start == 0.0
                )
                .with_for_update()
            ).one()
            snapshots = _replica_snapshots(conn, rollout_id)
            write = decide(row.state, snapshots)
            if write is None:
                return StepResult(row.state, False, None, snapshots)
            if write.evaluations:
                conn.execute(
                    insert(GateEvaluationRow),
                    [_evaluation_values(rollout_id, e) for e in write.evaluations],
                )
            for d in write.decisions:
                conn.execute(insert(DecisionRow).values(_decision_values(rollout_id, d)))
            values: dict[str, Any] = {}
            if write.stage is not None:
                values["stage"] = write.stage
            if write.verdict in _FINAL:
                values["status"] = _FINAL[write.verdict]
                values["ended_at"] = ts
            if values:
                conn.execute(update(RolloutRow).where(RolloutRow.id == rollout_id).values(values))
            conn.execute(
                update(t).where(t.id == row.id).values(state=write.state, window_end=ts, ts=ts)
            )
            return StepResult(write.state, True, write.result, snapshots)
    except SQLAlchemyError as exc:
        raise StorageError(f"decider step on rollout {rollout_id}: {exc}") from exc


def read_decider(db: Database, rollout_id: str) -> dict[str, Any] | None:
    """The decider's latest state (what every replica serves), or None before the first."""
    t = GateSnapshotRow
    try:
        with db.engine.connect() as conn:
            state = conn.execute(
                select(t.state).where(
                    t.rollout_id == rollout_id, t.replica_id == DECIDER_ID, t.window_start == 0.0
                )
            ).scalar()
    except SQLAlchemyError as exc:
        raise StorageError(f"read decider state of rollout {rollout_id}: {exc}") from exc
    return dict(state) if state else None


def run_step(
    db: Database, rollout_id: str, decide: StepFn, *, now: float | None = None
) -> StepResult:
    """A step on a pooled connection (manual actions on any replica)."""
    try:
        with db.engine.connect() as conn:
            return decider_step(conn, rollout_id, decide, now=now)
    except SQLAlchemyError as exc:
        raise StorageError(f"decider step on rollout {rollout_id}: {exc}") from exc


def replica_snapshots(db: Database, rollout_id: str) -> list[GateSnapshot]:
    try:
        with db.engine.connect() as conn:
            return _replica_snapshots(conn, rollout_id)
    except SQLAlchemyError as exc:
        raise StorageError(f"read snapshots of rollout {rollout_id}: {exc}") from exc


def labels_for(db: Database, record_ids: Sequence[str], *, chunk: int = 1000) -> dict[str, Any]:
    """The latest stored label of each of these record ids that has one (any replica
    may have received it: the replicas share the ``labels`` table)."""
    out: dict[str, Any] = {}
    ids = list(record_ids)
    try:
        with db.engine.connect() as conn:
            for i in range(0, len(ids), chunk):
                rows = conn.execute(
                    select(LabelRow.request_id, LabelRow.label)
                    .where(LabelRow.request_id.in_(ids[i : i + chunk]))
                    .order_by(LabelRow.id)
                ).all()
                for rid, label in rows:
                    if label is not None:
                        out[rid] = label  # a later label replaces an earlier one
    except SQLAlchemyError as exc:
        raise StorageError(f"read labels: {exc}") from exc
    return out


def _replica_snapshots(conn: Connection, rollout_id: str) -> list[GateSnapshot]:
    t = GateSnapshotRow
    rows = conn.execute(
        select(t.rollout_id, t.replica_id, t.window_start, t.window_end, t.state, t.ts)
        .where(t.rollout_id == rollout_id, t.replica_id.not_in((DECIDER_ID, RESUME_ID)))
        .order_by(t.replica_id, t.window_start)
    ).all()
    return [
        GateSnapshot(r.rollout_id, r.replica_id, r.window_start, r.window_end, r.state, r.ts)
        for r in rows
    ]


def _evaluation_values(rollout_id: str, e: GateEvaluation) -> dict[str, Any]:
    return {
        "rollout_id": rollout_id,
        "gate": e.gate,
        "slice": e.slice,
        "status": e.status,
        "statistic": e.statistic,
        "threshold": e.threshold,
        "n": int(e.n),
        "confidence": e.confidence,
        "method": e.method,
        "ts": e.ts,
        "details": e.details,
    }


def _decision_values(rollout_id: str, d: Decision) -> dict[str, Any]:
    return {
        "rollout_id": rollout_id,
        "verdict": d.verdict,
        "from_stage": d.from_stage,
        "to_stage": d.to_stage,
        "reason": d.reason,
        "actor_kind": d.actor_kind,
        "actor": d.actor,
        "ts": d.ts,
        "evidence": d.evidence,
    }


__all__ = [
    "DECIDER_ID",
    "RESUME_ID",
    "DeciderLease",
    "StepResult",
    "StepWrite",
    "decider_step",
    "labels_for",
    "lock_key",
    "read_decider",
    "replica_snapshots",
    "require_postgres",
    "run_step",
]
