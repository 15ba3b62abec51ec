"""Several replicas, one decision: the decider lease, the decider's atomic step, the ledger.

The SQL half of ``proxy/control/replicas.py`` (docs/replicas.md):

* :class:`DeciderLease` — a PostgreSQL *session* advisory lock
  (``pg_try_advisory_lock``) held on one dedicated connection. A replica that dies (even
  by SIGKILL) closes its socket; PostgreSQL ends the session and frees the lock, so a
  follower takes it on its next try. The lease's connection also runs the decider's
  steps, and each step's transaction first checks that this very session (its backend
  pid) still holds the lock (``pg_locks``): a session lost to ``pg_terminate_backend``
  or a server restart, even one the driver silently reconnected, writes nothing and
  drops the lease (:class:`LeaseLost`).
* :func:`decider_step` — ONE transaction: lock the rollout's decider row
  (``SELECT ... FOR UPDATE``: the periodic decider and an operator's manual action on
  any replica serialise there), read every replica's gate snapshot and the labelled
  pairs no step fed to the gates yet, let the caller evaluate, then write the
  evaluation rows, the decisions, the rollout's stage/status, the new decider state and
  the fed marks (``pairs.gated_seq``) together. A crash before the commit writes
  nothing; after it, everything — so no evaluation or label is lost or counted twice
  across a takeover.
* :func:`store_labels` — labels committed (and joined to their pairs) before the API
  acknowledges them.

The decider's state lives in ``gate_snapshots`` under the reserved replica id
:data:`DECIDER_ID` (window_start 0), purged by the same retention (its ``window_end``
moves with every step, so an active rollout's row stays young).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import SQLAlchemyError

from gates.records import PairRecord
from storage import labels as label_join
from storage.db import Database
from storage.entities import Decision, GateEvaluation, GateSnapshot, LabelEntry
from storage.errors import StorageError
from storage.rows import row_to_record, select_records
from storage.schema import (
    DecisionRow,
    GateEvaluationRow,
    GateSnapshotRow,
    LabelRow,
    PairRow,
    RolloutRow,
)

DECIDER_ID = "__decider__"
# A single proxy's resume state (proxy/control/persistence.py): never a replica's evidence, even
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


class LeaseLost(StorageError):
    """The lease's session no longer holds the advisory lock (it was terminated, the
    server restarted, or the driver reconnected under us): stop deciding at once."""


def lock_parts(key: int) -> tuple[int, int]:
    """How ``pg_locks`` shows a bigint advisory key: (classid, objid), objsubid 1."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


# The fence: this very session (the backend pid that took the lock) still holds it. A
# bare ``SELECT 1`` is not enough: after the session is lost, SQLAlchemy reconnects the
# invalidated connection transparently and the query succeeds on a session without
# the lock (issue 17: two deciders after pg_terminate_backend).
_HOLDS = text(
    "SELECT pg_backend_pid() = :pid AND EXISTS ("
    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid::bigint = :hi AND objid::bigint = :lo"
    " AND objsubid = 1)"
)


class DeciderLease:
    """The decider lease: a session advisory lock on a dedicated connection.

    Blocking calls (run them in a thread). Not thread-safe: one owner task.
    """

    def __init__(self, db: Database, name: str, rollout_id: str) -> None:
        require_postgres(db)
        self.db = db
        self.key = lock_key(name, rollout_id)
        self._hi, self._lo = lock_parts(self.key)
        self._conn: Connection | None = None
        self._pid: int | None = None
        self.lost = 0  # times the lease was found lost (not released)

    @property
    def held(self) -> bool:
        return self._conn is not None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend (session) holding the lock, while held."""
        return self._pid if self._conn is not None else None

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
                got, pid = conn.execute(
                    text("SELECT pg_try_advisory_lock(:k), pg_backend_pid()"), {"k": self.key}
                ).one()
        except SQLAlchemyError as exc:
            conn.invalidate()
            conn.close()
            raise StorageError(f"decider lease: {exc}") from exc
        if not got:
            conn.close()
            return False
        self._conn, self._pid = conn, int(pid)
        return True

    def holds(self, conn: Connection) -> bool:
        """On ``conn`` (inside its transaction): is this the session holding the lock?"""
        return bool(
            conn.execute(_HOLDS, {"pid": self._pid or -1, "hi": self._hi, "lo": self._lo}).scalar()
        )

    def check(self) -> bool:
        """Does the lease's session still hold the lock? Drops the lease when not."""
        if self._conn is None:
            return False
        try:
            with self._conn.begin():
                ok = self.holds(self._conn)
        except SQLAlchemyError:
            ok = False
        if not ok:
            self._lost()
        return ok

    def step(
        self, rollout_id: str, decide: StepFn, *, now: float | None = None, ledger_batch: int = 0
    ) -> StepResult:
        """:func:`decider_step` on the lease's own session, fenced: the step's
        transaction first checks that this session holds the lock (and writes nothing
        when it does not)."""
        conn = self._conn
        if conn is None:
            raise StorageError("decider lease not held")
        try:
            return decider_step(
                conn, rollout_id, decide, now=now, fence=self.holds, ledger_batch=ledger_batch
            )
        except LeaseLost:
            self._lost()
            raise
        except StorageError:
            if not self.check():
                raise LeaseLost("decider lease lost during a step") from None
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
            self.lost += 1
            try:
                # Invalidate: if the driver reconnected under us, the new session must
                # not go back to the pool as if it were ours.
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
    # The labelled pairs handed to ``decide`` are marked fed to the gates by this step
    # (``pairs.gated_seq``): the decider's ledger, exactly once per pair.
    gated_seq: int | None = None


@dataclass
class StepResult:
    state: dict[str, Any] | None
    written: bool
    result: Any = None
    snapshots: list[GateSnapshot] = field(default_factory=list)
    labelled: list[PairRecord] = field(default_factory=list)  # fed to the gates by this step


# decide(decider state or None, replica snapshots, labelled pairs not yet fed to the
# gates) -> what to write, or None for nothing
StepFn = Callable[[dict[str, Any] | None, list[GateSnapshot], list[PairRecord]], StepWrite | None]


def decider_step(
    conn: Connection,
    rollout_id: str,
    decide: StepFn,
    *,
    now: float | None = None,
    fence: Callable[[Connection], bool] | None = None,
    ledger_batch: int = 0,
) -> StepResult:
    """``fence``: checked first inside the transaction (the lease's session still holds
    the lock); when it fails nothing is read or written and :class:`LeaseLost` is raised.

    ``ledger_batch``: up to this many labelled pairs of the rollout that no step fed to
    the gates yet (oldest first, whichever replica recorded them and whichever received
    the label) are handed to ``decide``; a write with ``gated_seq`` marks them fed."""
    ts = time.time() if now is None else now
    t = GateSnapshotRow
    try:
        with conn.begin():
            if fence is not None and not fence(conn):
                raise LeaseLost("the decider lease's session no longer holds the lock")
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
            keys, labelled = _ungated(conn, rollout_id, ledger_batch) if ledger_batch else ([], [])
            write = decide(row.state, snapshots, labelled)
            if write is None:
                return StepResult(row.state, False, None, snapshots)
            if write.gated_seq is not None and keys:
                for part in range(0, len(keys), 1000):
                    conn.execute(
                        update(PairRow)
                        .where(PairRow.id.in_(keys[part : part + 1000]))
                        .values(gated_seq=write.gated_seq)
                    )
            else:
                labelled = []
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
            return StepResult(write.state, True, write.result, snapshots, labelled)
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


def store_labels(db: Database, entries: Sequence[LabelEntry], *, now: float) -> set[str]:
    """Store labels durably and join them to their pairs, in one transaction (several
    replicas: ``POST /v1/feedback`` answers 202 only after this commits). Returns the
    ids whose pair was already stored (joined now); the others wait in the shared
    table for their pair (the recorder's writes and sweep join them)."""
    ids = sorted({e.request_id for e in entries})
    present: set[str] = set()
    try:
        with db.engine.begin() as conn:
            label_join.insert_labels(conn, entries)
            for part in label_join.chunks(ids):
                present.update(
                    conn.execute(
                        select(PairRow.request_id).where(PairRow.request_id.in_(part)).distinct()
                    ).scalars()
                )
            if present:
                label_join.join_pending(conn, sorted(present), now=now)
    except SQLAlchemyError as exc:
        raise StorageError(f"store labels: {exc}") from exc
    return present


def sweep_labels(db: Database, *, now: float, batch: int = 5000) -> int:
    """Join pending labels whose pair is stored by now; returns how many ids joined.

    A label and its pair written at the same moment by two replicas' transactions can
    each miss the other (neither sees the other's uncommitted row). The recorder's
    periodic sweep (``purge_interval_s``) repairs that eventually; the decider runs
    this before each step so the gates get such a label within a snapshot period.
    Only ``pending`` labels (younger than ``label_window_s``): orphans are the
    recorder's sweep's."""
    total = 0
    try:
        while True:
            with db.engine.begin() as conn:
                ids = list(
                    conn.execute(
                        select(LabelRow.request_id)
                        .where(
                            LabelRow.status == "pending",
                            select(PairRow.id)
                            .where(PairRow.request_id == LabelRow.request_id)
                            .exists(),
                        )
                        .distinct()
                        .limit(batch)
                    ).scalars()
                )
                if ids:
                    label_join.join_pending(conn, ids, now=now)
            total += len(ids)
            if len(ids) < batch:
                return total
    except SQLAlchemyError as exc:
        raise StorageError(f"sweep pending labels: {exc}") from exc


def ledger_counts(db: Database, rollout_id: str) -> dict[str, int]:
    """Labelled pairs of a rollout: fed to the gates by a decider step, and waiting."""
    try:
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(PairRow.gated_seq.is_not(None), func.count())
                .where(PairRow.rollout_id == rollout_id, PairRow.label.is_not(None))
                .group_by(PairRow.gated_seq.is_not(None))
            ).all()
    except SQLAlchemyError as exc:
        raise StorageError(f"read the label ledger of rollout {rollout_id}: {exc}") from exc
    out = {"gated": 0, "waiting": 0}
    for gated, n in rows:
        out["gated" if gated else "waiting"] = int(n)
    return out


def _ungated(conn: Connection, rollout_id: str, limit: int) -> tuple[list[int], list[PairRecord]]:
    rows = conn.execute(
        select_records()
        .add_columns(PairRow.id.label("pair_key"))
        .where(
            PairRow.rollout_id == rollout_id,
            PairRow.label.is_not(None),
            PairRow.gated_seq.is_(None),
        )
        .order_by(PairRow.id)
        .limit(limit)
    ).all()
    return [int(r.pair_key) for r in rows], [row_to_record(r) for r in rows]


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
    "LeaseLost",
    "StepResult",
    "StepWrite",
    "decider_step",
    "ledger_counts",
    "lock_key",
    "read_decider",
    "replica_snapshots",
    "require_postgres",
    "run_step",
    "store_labels",
    "sweep_labels",
]
