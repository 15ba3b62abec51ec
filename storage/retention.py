"""Retention: the periodic purge of old pairs, labels, evaluations and snapshots.

Never touched: rollouts, decisions, pinned failures and their triage history,
baselines and sign-offs (the audit trail; pinned failures carry their own copy of the
evidence, so purging the pairs they came from loses nothing). Pending labels are never
deleted; past ``label_window_s`` they are marked orphaned (kept and reported), and
only joined or orphaned labels older than the age limit go.

Deletes run in chunks, each its own short transaction, so on SQLite the recorder's
writer is never locked out for long.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import ColumnElement, Connection, Delete, delete, select

from storage import labels as label_join
from storage.db import Database
from storage.entities import PurgeResult
from storage.schema import GateEvaluationRow, GateSnapshotRow, LabelRow, PairRow, RolloutRow

log = logging.getLogger(__name__)

CHUNK = 5000


_Purgeable = type[PairRow] | type[LabelRow] | type[GateEvaluationRow] | type[GateSnapshotRow]


def _delete_chunks(db: Database, build: Delete) -> int:
    """Run a ``DELETE ... WHERE id IN (SELECT id ... LIMIT CHUNK)`` until nothing is left."""
    total = 0
    while True:
        with db.engine.begin() as conn:
            n = int(conn.execute(build).rowcount or 0)
        total += n
        if n < CHUNK:
            return total


def _ids_where(table: _Purgeable, *conds: ColumnElement[bool]) -> Delete:
    ids = select(table.id).where(*conds).order_by(table.id).limit(CHUNK)
    return delete(table).where(table.id.in_(ids.scalar_subquery()))


def purge(
    db: Database,
    *,
    retention_days: float | None,
    retention_rows: int | None,
    label_window_s: float,
    now: float | None = None,
) -> PurgeResult:
    now = time.time() if now is None else now
    with db.engine.begin() as conn:
        orphaned = label_join.mark_orphans(conn, now=now, window_s=label_window_s)
    pairs = labels = evaluations = snapshots = 0
    if retention_days is not None:
        cutoff = now - retention_days * 86_400.0
        for rollout_id in _rollout_ids(db):
            pairs += _delete_chunks(
                db, _ids_where(PairRow, PairRow.rollout_id == rollout_id, PairRow.ts < cutoff)
            )
        labels += _delete_chunks(
            db,
            _ids_where(
                LabelRow,
                LabelRow.status.in_(("joined", "orphaned")),
                LabelRow.received_at < cutoff,
            ),
        )
        evaluations += _delete_chunks(
            db, _ids_where(GateEvaluationRow, GateEvaluationRow.ts < cutoff)
        )
        snapshots += _delete_chunks(
            db, _ids_where(GateSnapshotRow, GateSnapshotRow.window_end < cutoff)
        )
    if retention_rows is not None:
        with db.engine.connect() as conn:
            keep_from = _nth_newest_pair_id(conn, retention_rows)
        if keep_from is not None:
            pairs += _delete_chunks(db, _ids_where(PairRow, PairRow.id < keep_from))
    result = PurgeResult(
        pairs=pairs,
        labels=labels,
        gate_evaluations=evaluations,
        gate_snapshots=snapshots,
        orphaned_labels=orphaned,
    )
    if result.total or orphaned:
        log.info(
            "retention purge: %d pairs, %d labels, %d gate evaluations, %d snapshots deleted; "
            "%d labels newly orphaned (no pair within %.0f s; see orphan labels)",
            pairs,
            labels,
            evaluations,
            snapshots,
            orphaned,
            label_window_s,
        )
    return result


def _rollout_ids(db: Database) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(RolloutRow.id)).scalars())


def _nth_newest_pair_id(conn: Connection, n: int) -> int | None:
    """Id of the n-th newest pair (1-based): pairs older than it are over the limit."""
    return conn.execute(
        select(PairRow.id).order_by(PairRow.id.desc()).offset(n - 1).limit(1)
    ).scalar()
