"""The label join, on a connection inside the caller's transaction.

A label names a pair by its record id (``PairRecord.id``, the request id or
``<request id>#<row>``). Labels are always stored; ``join_pending`` copies the latest
pending label of each id onto every pair with that id and marks it joined. It runs
from both sides (after labels are stored, and after pairs land), and periodically over
everything pending (``sweep``), so neither arrival order nor a second replica writing
the other half loses a join. Labels still pending after ``label_window_s`` become
``orphaned``: kept and reported (``Store.orphan_labels``), and still joined should
their pair land later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from gates.records import PairRecord
from storage.entities import LabelEntry
from storage.rows import bulk_insert, clean_label, dumps, row_to_record, select_records
from storage.schema import LabelRow, PairRow

OPEN = ("pending", "orphaned")
# Keep IN lists well under SQLite's and PostgreSQL's parameter limits.
CHUNK = 500


def chunks(items: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


LABEL_COLUMNS = ("request_id", "label", "ts", "received_at", "status", "joined_at", "source")


def label_params(entry: LabelEntry) -> tuple[Any, ...]:
    """Insert parameters of one label, in ``LABEL_COLUMNS`` order."""
    return (
        entry.request_id,
        dumps(clean_label(entry.label)),
        float(entry.ts),
        float(entry.received_at),
        "pending",
        None,
        entry.source,
    )


def insert_label_params(conn: Connection, params: Sequence[tuple[Any, ...]]) -> None:
    bulk_insert(conn, "labels", LABEL_COLUMNS, frozenset({"label"}), params)


def insert_labels(conn: Connection, entries: Sequence[LabelEntry]) -> None:
    insert_label_params(conn, [label_params(e) for e in entries])


def join_pending(
    conn: Connection, request_ids: Iterable[str], *, now: float, want_records: bool = False
) -> list[PairRecord]:
    """Join open labels of these ids onto their pairs; returns the joined pairs (with
    the label set) when ``want_records``, else an empty list."""
    ids = sorted(set(request_ids))
    joined: list[PairRecord] = []
    for part in chunks(ids):
        latest: dict[str, tuple[Any, float]] = {}
        rows = conn.execute(
            select(LabelRow.request_id, LabelRow.label, LabelRow.ts)
            .where(LabelRow.request_id.in_(part), LabelRow.status.in_(OPEN))
            .order_by(LabelRow.id)
        )
        for rid, label, ts in rows:
            latest[rid] = (label, ts)  # the last one received wins (corrections)
        if not latest:
            continue
        present = set(
            conn.execute(
                select(PairRow.request_id).where(PairRow.request_id.in_(list(latest))).distinct()
            ).scalars()
        )
        if not present:
            continue
        matched = sorted(present)
        conn.execute(
            update(PairRow)
            .where(PairRow.request_id == bindparam("rid"))
            .values(label=bindparam("lbl"), label_ts=bindparam("lts"))
            .execution_options(synchronize_session=False),
            [{"rid": rid, "lbl": latest[rid][0], "lts": latest[rid][1]} for rid in matched],
        )
        conn.execute(
            update(LabelRow)
            .where(LabelRow.request_id.in_(matched), LabelRow.status.in_(OPEN))
            .values(status="joined", joined_at=now)
        )
        if want_records:
            for row in conn.execute(
                select_records().where(PairRow.request_id.in_(matched)).order_by(PairRow.id)
            ):
                joined.append(row_to_record(row))
    return joined


def any_pending(conn: Connection) -> bool:
    """Cheap check before a join: normally labels come after their pairs, so most
    batches of pairs have nothing to join (one indexed probe instead of an IN list)."""
    stmt = select(LabelRow.id).where(LabelRow.status == "pending").limit(1)
    return conn.execute(stmt).first() is not None


def open_ids_with_pairs(conn: Connection, limit: int = 10_000) -> list[str]:
    """Ids of open labels whose pair exists (missed joins: concurrent replicas)."""
    stmt = (
        select(LabelRow.request_id)
        .where(
            LabelRow.status.in_(OPEN),
            select(PairRow.id).where(PairRow.request_id == LabelRow.request_id).exists(),
        )
        .distinct()
        .limit(limit)
    )
    return list(conn.execute(stmt).scalars())


def mark_orphans(conn: Connection, *, now: float, window_s: float) -> int:
    result = conn.execute(
        update(LabelRow)
        .where(LabelRow.status == "pending", LabelRow.received_at < now - window_s)
        .values(status="orphaned")
    )
    return int(result.rowcount or 0)


def counts(conn: Connection) -> dict[str, int]:
    out = {"pending": 0, "joined": 0, "orphaned": 0}
    for status, n in conn.execute(select(LabelRow.status, func.count()).group_by(LabelRow.status)):
        out[str(status)] = int(n)
    return out
