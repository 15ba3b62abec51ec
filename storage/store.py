"""``Store``: synchronous reads and writes of everything but the hot pair stream.

Every method opens its own short transaction, so a Store is safe to share between
threads. It blocks on the database: the aiohttp app calls it through
``await asyncio.to_thread(store.method, ...)`` (or an executor), never on the event
loop. Database failures surface as :class:`StorageError`; unknown rows as
:class:`NotFoundError`; bad arguments as :class:`InvalidError`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gates.records import Label, ModelResult, PairRecord
from storage import labels as label_join
from storage.codec import (
    decode_inputs,
    decode_output,
    encode_inputs,
    encode_output,
    inputs_digest,
)
from storage.db import Database
from storage.entities import (
    PINNED_STATUSES,
    Baseline,
    Decision,
    GateEvaluation,
    GateSnapshot,
    HarvestedCase,
    HarvestResult,
    LabelCounts,
    LabelEntry,
    ModelInfo,
    PinnedCase,
    PurgeResult,
    Rollout,
    SignOff,
    TriageEntry,
)
from storage.errors import InvalidError, NotFoundError, StorageError
from storage.retention import purge
from storage.rows import (
    clean_label,
    insert_pairs,
    record_to_params,
    row_to_record,
    select_records,
)
from storage.schema import (
    BaselineRow,
    DecisionRow,
    GateEvaluationRow,
    GateSnapshotRow,
    LabelRow,
    PairRow,
    PinnedFailureRow,
    PinnedTriageRow,
    RolloutRow,
    SignOffRow,
)

ROLLOUT_STATUSES = ("active", "promoted", "aborted", "ended")


def new_rollout_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"r-{stamp}-{uuid.uuid4().hex[:6]}"


def _rollout(row: RolloutRow) -> Rollout:
    candidate = None
    if row.candidate_name is not None:
        candidate = ModelInfo(
            name=row.candidate_name,
            kind=row.candidate_kind or "",
            digest=row.candidate_digest or "",
            device=row.candidate_device or "cpu",
        )
    return Rollout(
        id=row.id,
        champion=ModelInfo(
            row.champion_name, row.champion_kind, row.champion_digest, row.champion_device
        ),
        candidate=candidate,
        config_digest=row.config_digest,
        task=row.task,
        created_at=row.created_at,
        ended_at=row.ended_at,
        status=row.status,
        stage=row.stage,
        extra=dict(row.extra or {}),
    )


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- plumbing -------------------------------------------------------------------

    def _run(self, what: str, fn: Any) -> Any:
        """Run ``fn(session)`` in one transaction; database errors become StorageError."""
        try:
            with Session(self.db.engine, expire_on_commit=False) as session, session.begin():
                return fn(session)
        except (NotFoundError, InvalidError):
            raise
        except SQLAlchemyError as exc:
            raise StorageError(f"{what} failed on {self.db.display_url}: {exc}") from exc

    # -- rollouts -------------------------------------------------------------------

    def create_rollout(
        self,
        champion: ModelInfo,
        candidate: ModelInfo | None = None,
        *,
        rollout_id: str | None = None,
        config_digest: str = "",
        task: str = "",
        stage: str = "shadow",
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> Rollout:
        """Record a new rollout (status active) and return it; the id is generated
        (``r-<UTC time>-<random>``) unless given."""
        ts = time.time() if now is None else now
        rid = rollout_id or new_rollout_id(ts)
        values = _rollout_values(rid, champion, candidate, config_digest, task, stage, extra, ts)

        def go(conn: Session) -> Rollout:
            if conn.get(RolloutRow, rid) is not None:
                raise InvalidError(f"rollout {rid!r} already exists")
            conn.execute(insert(RolloutRow), values)
            return self._get_rollout(conn, rid)

        result: Rollout = self._run("create rollout", go)
        return result

    def open_rollout(
        self,
        champion: ModelInfo,
        candidate: ModelInfo | None,
        *,
        config_digest: str = "",
        task: str = "",
        stage: str = "shadow",
        now: float | None = None,
        resume_ended: bool = False,
    ) -> Rollout:
        """The active rollout of exactly these models and config, else a new one.

        ``resume_ended`` (several replicas): the latest rollout of these models and
        config even when it ended (promoted, aborted), so a restarted replica joins the
        fleet's decision instead of opening ``-2`` on its own.

        What a server calls at start: a restart, or a second replica sharing the
        database, continues the same rollout instead of splitting its evidence. The id
        is derived from the identities (``r-<hash>``, ``-2``, ``-3``... once earlier
        ones ended), so replicas starting together agree on it.
        """
        base = _rollout_id_base(champion, candidate, config_digest, task)
        last: Rollout | None = None
        for n in range(1, 10_000):
            rid = base if n == 1 else f"{base}-{n}"
            try:
                existing = self.get_rollout(rid)
            except NotFoundError:
                if resume_ended and last is not None:
                    return last
                try:
                    return self.create_rollout(
                        champion,
                        candidate,
                        rollout_id=rid,
                        config_digest=config_digest,
                        task=task,
                        stage=stage,
                        now=now,
                    )
                except (InvalidError, StorageError):
                    existing = self.get_rollout(rid)  # another replica created it first
            if existing.status == "active":
                return existing
            last = existing
        raise StorageError(f"too many ended rollouts with id {base}")

    def latest_rollout(
        self,
        champion: ModelInfo,
        candidate: ModelInfo | None,
        *,
        config_digest: str,
        task: str,
    ) -> Rollout | None:
        """The newest rollout of exactly these models and experiment, whatever its status.

        What a restarting proxy resumes: an aborted rollout stays aborted (its candidate
        is not mirrored again) until a person starts a new one (issue 14).
        """
        t = RolloutRow
        stmt = (
            select(t)
            .where(
                t.champion_name == champion.name,
                t.champion_digest == champion.digest,
                t.config_digest == config_digest,
                t.task == task,
            )
            .order_by(t.created_at.desc(), t.id.desc())
        )
        if candidate is None:
            stmt = stmt.where(t.candidate_name.is_(None))
        else:
            stmt = stmt.where(
                t.candidate_name == candidate.name, t.candidate_digest == candidate.digest
            )
        row: Rollout | None = self._run(
            "find rollout",
            lambda c: next((_rollout(r) for r in c.execute(stmt.limit(1)).scalars()), None),
        )
        return row

    def start_rollout(
        self,
        champion: ModelInfo,
        candidate: ModelInfo | None,
        *,
        revision: str,
        config_digest: str = "",
        task: str = "",
        stage: str = "shadow",
        extra: dict[str, Any] | None = None,
        now: float | None = None,
        join_existing: bool = False,
    ) -> Rollout:
        """A new rollout of one candidate revision (``extra["revision"]``).

        ``join_existing``: return the latest rollout of this revision when there is one
        (replicas starting together from the configuration join one rollout).

        The id derives from the experiment and the revision (``r-<hash>``, then ``-2``,
        ``-3``... when that revision is judged again), so replicas racing to start the
        same revision agree on it: the one that loses the insert joins the winner's row.
        """
        base = _rollout_id_base(champion, candidate, config_digest, task, revision)
        previous: Rollout | None = None
        for n in range(1, 10_000):
            rid = base if n == 1 else f"{base}-{n}"
            try:
                previous = self.get_rollout(rid)
            except NotFoundError:
                if join_existing and previous is not None:
                    return previous
                try:
                    return self.create_rollout(
                        champion,
                        candidate,
                        rollout_id=rid,
                        config_digest=config_digest,
                        task=task,
                        stage=stage,
                        extra={**(extra or {}), "revision": revision},
                        now=now,
                    )
                except (InvalidError, StorageError):
                    # Another replica created this very id a moment ago: the same
                    # revision of the same experiment, so it is the rollout to join.
                    # (get_rollout re-raises when the database itself is the problem.)
                    return self.get_rollout(rid)
        raise StorageError(f"too many rollouts with id {base}")

    @staticmethod
    def _get_rollout(conn: Session, rollout_id: str) -> Rollout:
        row = conn.execute(select(RolloutRow).where(RolloutRow.id == rollout_id)).scalar()
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r}")
        return _rollout(row)

    def get_rollout(self, rollout_id: str) -> Rollout:
        result: Rollout = self._run("read rollout", lambda c: self._get_rollout(c, rollout_id))
        return result

    def list_rollouts(self, *, status: str | None = None, limit: int = 100) -> list[Rollout]:
        """Newest first."""
        stmt = select(RolloutRow).order_by(RolloutRow.created_at.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(RolloutRow.status == status)
        rows: list[Rollout] = self._run(
            "list rollouts", lambda c: [_rollout(r) for r in c.execute(stmt).scalars()]
        )
        return rows

    def update_rollout(
        self,
        rollout_id: str,
        *,
        status: str | None = None,
        stage: str | None = None,
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> Rollout:
        """Move a rollout's stage or status; a final status (not active) sets ended_at.
        ``extra`` is merged into the rollout's extra fields."""
        values: dict[str, Any] = {}
        if status is not None:
            if status not in ROLLOUT_STATUSES:
                raise InvalidError(f"rollout status must be one of {', '.join(ROLLOUT_STATUSES)}")
            values["status"] = status
            values["ended_at"] = None if status == "active" else (now or time.time())
        if stage is not None:
            values["stage"] = stage

        def go(conn: Session) -> Rollout:
            current = self._get_rollout(conn, rollout_id)
            if extra:
                values["extra"] = {**current.extra, **extra}
            if values:
                conn.execute(update(RolloutRow).where(RolloutRow.id == rollout_id).values(values))
            return self._get_rollout(conn, rollout_id)

        result: Rollout = self._run("update rollout", go)
        return result

    # -- pairs ----------------------------------------------------------------------

    def write_pairs(
        self,
        rollout_id: str,
        records: Iterable[PairRecord],
        *,
        store_inputs: bool = True,
        now: float | None = None,
    ) -> int:
        """Insert records in ONE transaction (all or nothing: an exception from the
        iterable, e.g. a bad line of a file, rolls everything back) and join pending
        labels; returns the count. For imports and tools; the proxy uses SqlRecorder."""

        def go(conn: Session) -> int:
            self._get_rollout(conn, rollout_id)
            return self._insert_records(conn, rollout_id, records, store_inputs, now)

        result: int = self._run("write pairs", go)
        return result

    def import_pairs(
        self,
        records: Iterable[PairRecord],
        *,
        source: ModelInfo,
        rollout_id: str | None = None,
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> tuple[str, int, bool]:
        """Load records into ``rollout_id`` (created, with ``source`` as both models'
        identity, when missing or not given), all in one transaction.
        Returns (rollout id, pairs written, whether the rollout was created)."""
        ts = time.time() if now is None else now

        def go(conn: Session) -> tuple[str, int, bool]:
            rid = rollout_id
            created = rid is None or conn.get(RolloutRow, rid) is None
            if created:
                rid = rid or new_rollout_id(ts)
                conn.execute(
                    insert(RolloutRow),
                    _rollout_values(rid, source, source, "", "", "shadow", extra, ts),
                )
            assert rid is not None
            return rid, self._insert_records(conn, rid, records, True, ts), created

        result: tuple[str, int, bool] = self._run("import pairs", go)
        return result

    @staticmethod
    def _insert_records(
        conn: Session,
        rollout_id: str,
        records: Iterable[PairRecord],
        store_inputs: bool,
        now: float | None,
        chunk: int = 1000,
    ) -> int:
        raw = conn.connection()
        n = 0
        batch: list[tuple[Any, ...]] = []
        ids: list[str] = []
        for record in records:
            batch.append(record_to_params(record, rollout_id, store_inputs=store_inputs))
            ids.append(record.id)
            if len(batch) >= chunk:
                insert_pairs(raw, batch)
                n += len(batch)
                batch.clear()
        insert_pairs(raw, batch)
        n += len(batch)
        label_join.join_pending(raw, ids, now=time.time() if now is None else now)
        return n

    def iter_pairs(
        self,
        rollout_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        labelled: bool | None = None,
        with_inputs: bool = False,
        chunk: int = 1000,
    ) -> Iterator[PairRecord]:
        """Pairs of a rollout in the order they were written (keyset pagination, so a
        long export neither holds one huge transaction nor skips rows)."""
        self.get_rollout(rollout_id)
        last = 0
        while True:
            stmt = select_records(with_inputs=with_inputs).where(
                PairRow.rollout_id == rollout_id, PairRow.id > last
            )
            if since is not None:
                stmt = stmt.where(PairRow.ts >= since)
            if until is not None:
                stmt = stmt.where(PairRow.ts < until)
            if labelled is True:
                stmt = stmt.where(PairRow.label.is_not(None))
            elif labelled is False:
                stmt = stmt.where(PairRow.label.is_(None))
            stmt = stmt.order_by(PairRow.id).limit(chunk)
            page = self._run("read pairs", lambda c, s=stmt: list(c.execute(s)))
            for row in page:
                yield row_to_record(row, with_inputs=with_inputs)
            if len(page) < chunk:
                return
            last = page[-1]._mapping["id"]

    def get_pairs(
        self, request_id: str, *, rollout_id: str | None = None, with_inputs: bool = False
    ) -> list[PairRecord]:
        stmt = select_records(with_inputs=with_inputs).where(PairRow.request_id == request_id)
        if rollout_id is not None:
            stmt = stmt.where(PairRow.rollout_id == rollout_id)
        rows = self._run("read pairs", lambda c: list(c.execute(stmt.order_by(PairRow.id))))
        return [row_to_record(r, with_inputs=with_inputs) for r in rows]

    def count_pairs(self, rollout_id: str | None = None, *, with_inputs: bool | None = None) -> int:
        stmt = select(func.count()).select_from(PairRow)
        if rollout_id is not None:
            stmt = stmt.where(PairRow.rollout_id == rollout_id)
        if with_inputs is True:
            stmt = stmt.where(PairRow.inputs.is_not(None))
        elif with_inputs is False:
            stmt = stmt.where(PairRow.inputs.is_(None))
        result: int = self._run("count pairs", lambda c: int(c.execute(stmt).scalar_one()))
        return result

    # -- labels ---------------------------------------------------------------------

    def add_labels(
        self, entries: Sequence[LabelEntry], *, now: float | None = None
    ) -> list[PairRecord]:
        """Store labels and join them now where their pairs exist (synchronous path:
        label files, tools). Returns the pairs that got a label."""
        ts = time.time() if now is None else now

        def go(conn: Session) -> list[PairRecord]:
            label_join.insert_labels(conn.connection(), entries)
            return label_join.join_pending(
                conn.connection(), [e.request_id for e in entries], now=ts, want_records=True
            )

        result: list[PairRecord] = self._run("store labels", go)
        return result

    def label_counts(self) -> LabelCounts:
        c = self._run("count labels", lambda s: label_join.counts(s.connection()))
        return LabelCounts(pending=c["pending"], joined=c["joined"], orphaned=c["orphaned"])

    def orphan_labels(self, *, limit: int = 1000, since: float | None = None) -> list[LabelEntry]:
        """Labels whose pair never arrived within ``label_window_s`` (oldest first)."""
        return self._labels("orphaned", limit=limit, since=since)

    def pending_labels(self, *, limit: int = 1000) -> list[LabelEntry]:
        return self._labels("pending", limit=limit, since=None)

    def _labels(self, status: str, *, limit: int, since: float | None) -> list[LabelEntry]:
        stmt = select(LabelRow).where(LabelRow.status == status)
        if since is not None:
            stmt = stmt.where(LabelRow.received_at >= since)
        stmt = stmt.order_by(LabelRow.received_at, LabelRow.id).limit(limit)
        rows = self._run("read labels", lambda c: list(c.execute(stmt).scalars()))
        return [
            LabelEntry(
                request_id=r.request_id,
                label=r.label,
                ts=r.ts,
                received_at=r.received_at,
                status=r.status,
                joined_at=r.joined_at,
                source=r.source,
            )
            for r in rows
        ]

    def sweep_labels(self, *, window_s: float, now: float | None = None) -> tuple[int, int]:
        """Join open labels whose pairs exist, mark the overdue as orphaned.
        Returns (joined label ids, newly orphaned)."""
        ts = time.time() if now is None else now

        def go(conn: Session) -> tuple[int, int]:
            c = conn.connection()
            ids = label_join.open_ids_with_pairs(c)
            label_join.join_pending(c, ids, now=ts)
            return len(ids), label_join.mark_orphans(c, now=ts, window_s=window_s)

        result: tuple[int, int] = self._run("sweep labels", go)
        return result

    # -- gate evaluations, snapshots ------------------------------------------------

    def record_gate_evaluations(
        self, rollout_id: str, evaluations: Sequence[GateEvaluation]
    ) -> int:
        rows = [
            {
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
            for e in evaluations
        ]

        def go(conn: Session) -> int:
            if rows:
                conn.execute(insert(GateEvaluationRow), rows)
            return len(rows)

        result: int = self._run("record gate evaluations", go)
        return result

    def gate_evaluations(
        self,
        rollout_id: str,
        *,
        gate: str | None = None,
        slice: str | None = None,
        since: float | None = None,
        until: float | None = None,
        latest_only: bool = False,
    ) -> list[GateEvaluation]:
        """In time order; ``latest_only``: the newest row of each (gate, slice)."""
        t = GateEvaluationRow
        stmt = select(t).where(t.rollout_id == rollout_id)
        if gate is not None:
            stmt = stmt.where(t.gate == gate)
        if slice is not None:
            stmt = stmt.where(t.slice == slice)
        if since is not None:
            stmt = stmt.where(t.ts >= since)
        if until is not None:
            stmt = stmt.where(t.ts < until)
        if latest_only:
            newest = (
                select(func.max(t.id).label("id"))
                .where(t.rollout_id == rollout_id)
                .group_by(t.gate, t.slice)
                .subquery()
            )
            stmt = stmt.where(t.id.in_(select(newest.c.id)))
        stmt = stmt.order_by(t.ts, t.id)
        rows = self._run("read gate evaluations", lambda c: list(c.execute(stmt).scalars()))
        return [
            GateEvaluation(
                gate=r.gate,
                status=r.status,
                statistic=r.statistic,
                threshold=r.threshold,
                n=r.n,
                method=r.method,
                ts=r.ts,
                slice=r.slice,
                confidence=r.confidence,
                details=r.details,
                rollout_id=r.rollout_id,
            )
            for r in rows
        ]

    def save_gate_snapshot(self, snapshot: GateSnapshot) -> None:
        """Insert or replace the state of (rollout, replica, window_start)."""
        values = {
            "rollout_id": snapshot.rollout_id,
            "replica_id": snapshot.replica_id,
            "window_start": snapshot.window_start,
            "window_end": snapshot.window_end,
            "state": snapshot.state,
            "ts": snapshot.ts,
        }

        def go(conn: Session) -> None:
            ins = (postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert)(
                GateSnapshotRow
            )
            conn.execute(
                ins.values(values).on_conflict_do_update(
                    index_elements=["rollout_id", "replica_id", "window_start"],
                    set_={
                        "window_end": values["window_end"],
                        "state": ins.excluded.state,
                        "ts": values["ts"],
                    },
                )
            )

        self._run("save gate snapshot", go)

    def gate_snapshots(self, rollout_id: str, *, since: float | None = None) -> list[GateSnapshot]:
        t = GateSnapshotRow
        stmt = select(t).where(t.rollout_id == rollout_id)
        if since is not None:
            stmt = stmt.where(t.window_end > since)
        stmt = stmt.order_by(t.window_start, t.replica_id)
        rows = self._run("read gate snapshots", lambda c: list(c.execute(stmt).scalars()))
        return [
            GateSnapshot(r.rollout_id, r.replica_id, r.window_start, r.window_end, r.state, r.ts)
            for r in rows
        ]

    # -- decisions, sign-offs, baselines ---------------------------------------------

    def record_decision(self, rollout_id: str, decision: Decision) -> Decision:
        if decision.actor_kind not in ("engine", "operator"):
            raise InvalidError("decision actor_kind must be 'engine' or 'operator'")
        if not decision.actor:
            raise InvalidError("a decision needs an actor")
        values = {
            "rollout_id": rollout_id,
            "verdict": decision.verdict,
            "from_stage": decision.from_stage,
            "to_stage": decision.to_stage,
            "reason": decision.reason,
            "actor_kind": decision.actor_kind,
            "actor": decision.actor,
            "ts": decision.ts,
            "evidence": decision.evidence,
        }

        def go(conn: Session) -> Decision:
            self._get_rollout(conn, rollout_id)
            new_id = conn.execute(
                insert(DecisionRow).values(values).returning(DecisionRow.id)
            ).scalar_one()
            return _decision(conn.get_one(DecisionRow, new_id))

        result: Decision = self._run("record decision", go)
        return result

    def decisions(self, rollout_id: str) -> list[Decision]:
        stmt = (
            select(DecisionRow)
            .where(DecisionRow.rollout_id == rollout_id)
            .order_by(DecisionRow.ts, DecisionRow.id)
        )
        rows = self._run("read decisions", lambda c: list(c.execute(stmt).scalars()))
        return [_decision(r) for r in rows]

    def record_signoff(self, signoff: SignOff) -> None:
        if not signoff.reviewer:
            raise InvalidError("a sign-off needs a reviewer")

        def go(conn: Session) -> None:
            self._get_rollout(conn, signoff.rollout_id)
            conn.execute(
                insert(SignOffRow).values(
                    rollout_id=signoff.rollout_id,
                    reviewer=signoff.reviewer,
                    decision=signoff.decision,
                    report_digest=signoff.report_digest,
                    note=signoff.note,
                    ts=signoff.ts,
                )
            )

        self._run("record sign-off", go)

    def signoffs(self, rollout_id: str) -> list[SignOff]:
        stmt = (
            select(SignOffRow)
            .where(SignOffRow.rollout_id == rollout_id)
            .order_by(SignOffRow.ts, SignOffRow.id)
        )
        rows = self._run("read sign-offs", lambda c: list(c.execute(stmt).scalars()))
        return [
            SignOff(r.rollout_id, r.reviewer, r.decision, r.report_digest, r.note, r.ts)
            for r in rows
        ]

    def save_baseline(
        self,
        name: str,
        data: dict[str, Any] | None,
        *,
        actor: str,
        reason: str,
        rollout_id: str | None = None,
        now: float | None = None,
    ) -> Baseline:
        """A new current baseline for ``name``: a deliberate act, so who and why are
        required. Older rows are kept (history)."""
        if not actor or not reason:
            raise InvalidError("moving a baseline needs an actor and a reason")
        ts = time.time() if now is None else now

        def go(conn: Session) -> Baseline:
            conn.execute(
                update(BaselineRow)
                .where(BaselineRow.name == name, BaselineRow.active.is_(True))
                .values(active=False)
            )
            new_id = conn.execute(
                insert(BaselineRow)
                .values(
                    name=name,
                    rollout_id=rollout_id,
                    data=data,
                    actor=actor,
                    reason=reason,
                    ts=ts,
                    active=True,
                )
                .returning(BaselineRow.id)
            ).scalar_one()
            return _baseline(conn.get_one(BaselineRow, new_id))

        result: Baseline = self._run("save baseline", go)
        return result

    def current_baseline(self, name: str) -> Baseline | None:
        stmt = (
            select(BaselineRow)
            .where(BaselineRow.name == name, BaselineRow.active.is_(True))
            .order_by(BaselineRow.id.desc())
            .limit(1)
        )
        row = self._run("read baseline", lambda c: c.execute(stmt).scalar())
        return None if row is None else _baseline(row)

    def baseline_history(self, name: str) -> list[Baseline]:
        stmt = select(BaselineRow).where(BaselineRow.name == name).order_by(BaselineRow.id)
        rows = self._run("read baselines", lambda c: list(c.execute(stmt).scalars()))
        return [_baseline(r) for r in rows]

    # -- pinned failures ------------------------------------------------------------

    def harvest(self, case: HarvestedCase, *, now: float | None = None) -> HarvestResult:
        """Insert a harvested failure, or count a recurrence of the same (task, inputs
        digest). The first occurrence's evidence is kept: a case never changes except
        by triage."""
        return self.harvest_many([case], now=now)[0]

    def harvest_many(
        self, cases: Sequence[HarvestedCase], *, now: float | None = None
    ) -> list[HarvestResult]:
        """``harvest`` for a batch in ONE transaction (the online harvester's writer:
        one commit per batch, never one per case). Raises InvalidError before writing
        anything when a case has neither an inputs digest nor inputs."""
        ts = time.time() if now is None else now
        rows = [(case, _harvest_values(case, ts)) for case in cases]
        t = PinnedFailureRow
        sqlite_dialect = self.db.dialect == "sqlite"

        def go(conn: Session) -> list[HarvestResult]:
            out: list[HarvestResult] = []
            for case, values in rows:
                ins = (sqlite.insert if sqlite_dialect else postgresql.insert)(t)
                stmt = (
                    ins.values(values)
                    .on_conflict_do_update(
                        index_elements=["task", "inputs_digest"],
                        set_={
                            "recurrence_count": t.recurrence_count + 1,
                            "last_seen": func.max(t.last_seen, ins.excluded.last_seen)
                            if sqlite_dialect
                            else func.greatest(t.last_seen, ins.excluded.last_seen),
                            "first_seen": func.min(t.first_seen, ins.excluded.first_seen)
                            if sqlite_dialect
                            else func.least(t.first_seen, ins.excluded.first_seen),
                            # The evidence keeps its inputs; fill them if the first had none.
                            "inputs": func.coalesce(t.inputs, ins.excluded.inputs),
                            "updated_at": ins.excluded.updated_at,
                        },
                    )
                    .returning(t.id, t.recurrence_count, t.status)
                )
                cid, count, status = conn.execute(stmt).one()
                if count == 1:
                    conn.execute(
                        insert(PinnedTriageRow).values(
                            pinned_id=cid,
                            actor="harvest",
                            reason=f"caught by rule {case.rule}",
                            from_status=None,
                            to_status="candidate",
                            expected_label=None,
                            score_tolerance=None,
                            ts=ts,
                        )
                    )
                out.append(HarvestResult(int(cid), count == 1, int(count), str(status)))
            return out

        if not rows:
            return []
        result: list[HarvestResult] = self._run("harvest failures", go)
        return result

    def get_pinned(self, case_id: int, *, with_inputs: bool = True) -> PinnedCase:
        def go(conn: Session) -> PinnedCase:
            row = conn.get(PinnedFailureRow, case_id)
            if row is None:
                raise NotFoundError(f"no pinned case {case_id}")
            return _pinned(row, with_inputs=with_inputs)

        result: PinnedCase = self._run("read pinned case", go)
        return result

    def find_pinned(self, task: str, inputs_digest: str) -> PinnedCase | None:
        stmt = select(PinnedFailureRow).where(
            PinnedFailureRow.task == task, PinnedFailureRow.inputs_digest == inputs_digest
        )
        row = self._run("read pinned case", lambda c: c.execute(stmt).scalar())
        return None if row is None else _pinned(row, with_inputs=True)

    def list_pinned(
        self,
        *,
        status: str | None = None,
        task: str | None = None,
        with_inputs: bool = False,
        limit: int | None = None,
    ) -> list[PinnedCase]:
        """By id (creation order), so exports are stable."""
        if status is not None and status not in PINNED_STATUSES:
            raise InvalidError(f"status must be one of {', '.join(PINNED_STATUSES)}")
        stmt = select(PinnedFailureRow).order_by(PinnedFailureRow.id)
        if status is not None:
            stmt = stmt.where(PinnedFailureRow.status == status)
        if task is not None:
            stmt = stmt.where(PinnedFailureRow.task == task)
        if limit is not None:
            stmt = stmt.limit(limit)
        rows = self._run("list pinned cases", lambda c: list(c.execute(stmt).scalars()))
        return [_pinned(r, with_inputs=with_inputs) for r in rows]

    def triage(
        self,
        case_id: int,
        to_status: str,
        *,
        actor: str,
        reason: str,
        expected_label: Label = None,
        score_tolerance: float | None = None,
        now: float | None = None,
    ) -> PinnedCase:
        """Move a case to ``pinned`` (with its expected label: given, else the case's
        label) or ``dismissed`` (or back to ``candidate``); who and why are required
        and recorded in the triage history."""
        if to_status not in PINNED_STATUSES:
            raise InvalidError(f"status must be one of {', '.join(PINNED_STATUSES)}")
        if not actor or not reason:
            raise InvalidError("triage needs an actor and a reason")
        if score_tolerance is not None and not score_tolerance >= 0:
            raise InvalidError("score_tolerance must be >= 0")
        ts = time.time() if now is None else now

        def go(conn: Session) -> PinnedCase:
            row = conn.execute(
                select(PinnedFailureRow).where(PinnedFailureRow.id == case_id).with_for_update()
            ).scalar()
            if row is None:
                raise NotFoundError(f"no pinned case {case_id}")
            previous = row.status  # read before the update refreshes the row
            expected = clean_label(expected_label)
            tolerance = score_tolerance
            if to_status == "pinned":
                if expected is None:
                    expected = row.expected_label if row.expected_label is not None else row.label
                if expected is None:
                    raise InvalidError(
                        f"pinning case {case_id} needs an expected label (it has no label)"
                    )
                if tolerance is None:
                    tolerance = row.score_tolerance
            else:
                expected, tolerance = None, None
            conn.execute(
                update(PinnedFailureRow)
                .where(PinnedFailureRow.id == case_id)
                .values(
                    status=to_status,
                    expected_label=expected,
                    score_tolerance=tolerance,
                    updated_at=ts,
                )
            )
            conn.execute(
                insert(PinnedTriageRow).values(
                    pinned_id=case_id,
                    actor=actor,
                    reason=reason,
                    from_status=previous,
                    to_status=to_status,
                    expected_label=expected,
                    score_tolerance=tolerance,
                    ts=ts,
                )
            )
            return _pinned(conn.get_one(PinnedFailureRow, case_id), with_inputs=False)

        result: PinnedCase = self._run("triage pinned case", go)
        return result

    def triage_history(self, case_id: int) -> list[TriageEntry]:
        stmt = (
            select(PinnedTriageRow)
            .where(PinnedTriageRow.pinned_id == case_id)
            .order_by(PinnedTriageRow.id)
        )
        rows = self._run("read triage history", lambda c: list(c.execute(stmt).scalars()))
        return [
            TriageEntry(
                pinned_id=r.pinned_id,
                actor=r.actor,
                reason=r.reason,
                from_status=r.from_status,
                to_status=r.to_status,
                expected_label=r.expected_label,
                score_tolerance=r.score_tolerance,
                ts=r.ts,
            )
            for r in rows
        ]

    # -- retention ------------------------------------------------------------------

    def purge(
        self,
        *,
        retention_days: float | None,
        retention_rows: int | None,
        label_window_s: float,
        now: float | None = None,
    ) -> PurgeResult:
        """Delete what the retention limits allow (see ``storage.retention``)."""
        return purge(
            self.db,
            retention_days=retention_days,
            retention_rows=retention_rows,
            label_window_s=label_window_s,
            now=now,
        )


def _rollout_values(
    rid: str,
    champion: ModelInfo,
    candidate: ModelInfo | None,
    config_digest: str,
    task: str,
    stage: str,
    extra: dict[str, Any] | None,
    ts: float,
) -> dict[str, Any]:
    return {
        "id": rid,
        "champion_name": champion.name,
        "champion_kind": champion.kind,
        "champion_digest": champion.digest,
        "champion_device": champion.device,
        "candidate_name": candidate.name if candidate else None,
        "candidate_kind": candidate.kind if candidate else None,
        "candidate_digest": candidate.digest if candidate else None,
        "candidate_device": candidate.device if candidate else None,
        "config_digest": config_digest,
        "task": task,
        "created_at": ts,
        "ended_at": None,
        "status": "active",
        "stage": stage,
        "extra": extra or None,
    }


def _decision(r: DecisionRow) -> Decision:
    return Decision(
        verdict=r.verdict,
        actor_kind="engine" if r.actor_kind == "engine" else "operator",
        actor=r.actor,
        reason=r.reason,
        ts=r.ts,
        from_stage=r.from_stage,
        to_stage=r.to_stage,
        evidence=r.evidence,
        rollout_id=r.rollout_id,
        id=r.id,
    )


def _baseline(r: BaselineRow) -> Baseline:
    return Baseline(r.id, r.name, r.data, r.actor, r.reason, r.ts, r.rollout_id)


def _pinned(r: PinnedFailureRow, *, with_inputs: bool) -> PinnedCase:
    evidence = PairRecord(
        id=r.request_id,
        ts=r.seen_at,
        champion=ModelResult(
            output=decode_output(r.champion_output),
            error=r.champion_error,
            name=r.champion_output_name,
            datatype=r.champion_datatype,
            shape=_shape_of(r.champion_shape),
        ),
        candidate=ModelResult(
            output=decode_output(r.candidate_output),
            error=r.candidate_error,
            name=r.candidate_output_name,
            datatype=r.candidate_datatype,
            shape=_shape_of(r.candidate_shape),
        ),
        slices=dict(r.slices or {}),
        label=r.label,
        inputs_digest=r.inputs_digest,
    )
    return PinnedCase(
        id=r.id,
        task=r.task,
        inputs_digest=r.inputs_digest,
        status=r.status,
        rule=r.rule,
        evidence=evidence,
        inputs=decode_inputs(r.inputs) if with_inputs and r.inputs is not None else None,
        rollout_id=r.rollout_id,
        champion=ModelInfo.from_dict(r.champion_identity),
        candidate=ModelInfo.from_dict(r.candidate_identity),
        first_seen=r.first_seen,
        last_seen=r.last_seen,
        recurrence_count=r.recurrence_count,
        expected_label=r.expected_label,
        score_tolerance=r.score_tolerance,
        updated_at=r.updated_at,
    )


__all__ = ["Store", "new_rollout_id"]


def _shape_list(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else [int(d) for d in shape]


def _shape_of(value: Any) -> tuple[int, ...] | None:
    # JSON columns come back parsed (a list) on both databases.
    return None if value is None else tuple(int(d) for d in value)


def _harvest_values(case: HarvestedCase, ts: float) -> dict[str, Any]:
    record = case.record
    inputs = case.inputs if case.inputs is not None else record.inputs
    digest = record.inputs_digest
    if not digest:
        if not inputs:
            raise InvalidError("a harvested case needs an inputs digest or its inputs")
        digest = inputs_digest(inputs)
    return {
        "task": case.task,
        "inputs_digest": digest,
        "status": "candidate",
        "rule": case.rule,
        "inputs": encode_inputs(inputs) if inputs else None,
        "champion_output": encode_output(record.champion.output),
        "candidate_output": encode_output(record.candidate.output),
        "champion_error": record.champion.error,
        "candidate_error": record.candidate.error,
        "champion_output_name": record.champion.name,
        "champion_datatype": record.champion.datatype,
        "champion_shape": _shape_list(record.champion.shape),
        "candidate_output_name": record.candidate.name,
        "candidate_datatype": record.candidate.datatype,
        "candidate_shape": _shape_list(record.candidate.shape),
        "label": clean_label(record.label),
        "slices": dict(record.slices),
        "request_id": record.id,
        "rollout_id": case.rollout_id,
        "champion_identity": case.champion.to_dict() if case.champion else None,
        "candidate_identity": case.candidate.to_dict() if case.candidate else None,
        "seen_at": record.ts,
        "first_seen": record.ts,
        "last_seen": record.ts,
        "recurrence_count": 1,
        "expected_label": None,
        "score_tolerance": None,
        "updated_at": ts,
    }


def _rollout_id_base(
    champion: ModelInfo, candidate: ModelInfo | None, config_digest: str, task: str, *more: str
) -> str:
    """``r-<hash>`` of what identifies a rollout, so replicas starting together agree."""
    basis = "|".join(
        [
            champion.digest,
            champion.name,
            candidate.digest if candidate else "",
            candidate.name if candidate else "",
            config_digest,
            task,
            *more,
        ]
    )
    return "r-" + hashlib.sha256(basis.encode()).hexdigest()[:12]
