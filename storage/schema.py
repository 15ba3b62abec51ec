"""The database schema: SQLAlchemy 2 typed declarative models.

Portable across SQLite and PostgreSQL: times are epoch seconds in DOUBLE columns (the
same float as ``PairRecord.ts``, cheap range scans, no time-zone ambiguity), JSON
columns are JSONB on PostgreSQL, tensors are bytes (``storage.codec``), never JSON lists.
Changing a model here needs an Alembic revision in ``storage/migrations/versions``; the
test ``test_migrations_match_models`` fails when the two disagree.

What retention may purge: ``pairs``, ``labels``, ``gate_evaluations``,
``gate_snapshots``. Everything else (rollouts, decisions, pinned failures and their
triage, baselines, sign-offs) is kept: it is the audit trail.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Names for constraints and indexes, so migrations are identical on both databases.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only makes INTEGER PRIMARY KEY an auto-increment rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Blob = LargeBinary().with_variant(BYTEA(), "postgresql")

NAME = 200  # model names, gate names, actors
SHORT = 32  # statuses, stages, verdicts


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: dict[Any, Any] = {float: Double(), dict[str, Any]: Json}


class RolloutRow(Base):
    """One champion-vs-candidate comparison; every pair and evaluation belongs to one."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    champion_name: Mapped[str] = mapped_column(String(NAME))
    champion_kind: Mapped[str] = mapped_column(String(SHORT))
    champion_digest: Mapped[str] = mapped_column(String(NAME))
    champion_device: Mapped[str] = mapped_column(String(SHORT), default="cpu")
    candidate_name: Mapped[str | None] = mapped_column(String(NAME))
    candidate_kind: Mapped[str | None] = mapped_column(String(SHORT))
    candidate_digest: Mapped[str | None] = mapped_column(String(NAME))
    candidate_device: Mapped[str | None] = mapped_column(String(SHORT))
    config_digest: Mapped[str] = mapped_column(String(NAME), default="")
    task: Mapped[str] = mapped_column(String(NAME), default="")
    created_at: Mapped[float]
    ended_at: Mapped[float | None]
    # active | promoted | aborted | ended
    status: Mapped[str] = mapped_column(String(SHORT), default="active")
    stage: Mapped[str] = mapped_column(String(SHORT), default="shadow")
    extra: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (Index(None, "status", "created_at"),)


_UNGATED = text("label IS NOT NULL AND gated_seq IS NULL")


class PairRow(Base):
    """One row of one mirrored request: both models' outputs, and the label once joined."""

    __tablename__ = "pairs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    request_id: Mapped[str] = mapped_column(String(255))
    ts: Mapped[float]
    slices: Mapped[dict[str, Any] | None] = mapped_column(Json)
    features: Mapped[dict[str, Any] | None] = mapped_column(Json)
    inputs_digest: Mapped[str] = mapped_column(String(128), default="")
    # npz bytes (storage.codec.encode_inputs), only under the capture policy.
    inputs: Mapped[bytes | None] = mapped_column(Blob)
    champion_output: Mapped[bytes | None] = mapped_column(Blob)
    champion_latency_ms: Mapped[float | None]
    champion_error: Mapped[str | None] = mapped_column(Text)
    candidate_output: Mapped[bytes | None] = mapped_column(Blob)
    candidate_latency_ms: Mapped[float | None]
    candidate_error: Mapped[str | None] = mapped_column(Text)
    label: Mapped[Any | None] = mapped_column(Json)
    label_ts: Mapped[float | None]
    stage: Mapped[str] = mapped_column(String(SHORT), default="shadow")
    served_by: Mapped[str] = mapped_column(String(16), default="champion")
    # Output descriptors (name, V2 datatype, per-row shape as a JSON list; NULL when the
    # producer did not say): what the contract gate compares after a round trip.
    champion_output_name: Mapped[str | None] = mapped_column(String(NAME))
    champion_datatype: Mapped[str | None] = mapped_column(String(SHORT))
    champion_shape: Mapped[Any | None] = mapped_column(Json)
    candidate_output_name: Mapped[str | None] = mapped_column(String(NAME))
    candidate_datatype: Mapped[str | None] = mapped_column(String(SHORT))
    candidate_shape: Mapped[Any | None] = mapped_column(Json)
    # Several replicas (storage/replicas.py): the decider step that fed this labelled
    # pair to the gates, exactly once for the rollout whichever replica recorded it.
    gated_seq: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        # Label joins look up a request id in any rollout; exports and reads in one.
        Index(None, "request_id", "rollout_id"),
        # Time-range reads of a rollout, and the age purge (per rollout).
        Index(None, "rollout_id", "ts"),
        # The decider's ledger: labelled pairs its gates have not seen yet (partial, so
        # it holds only the few waiting ones, however long the rollout).
        Index(
            "ix_pairs_ungated",
            "rollout_id",
            "id",
            postgresql_where=_UNGATED,
            sqlite_where=_UNGATED,
        ),
        # No index on inputs_digest: random 64-hex keys cost more per insert than the
        # rest of the row; digest lookups go to pinned_failures (unique per task).
    )


class LabelRow(Base):
    """Every label received (``POST /v1/feedback``, label files), joined or not.

    ``status``: pending (no pair yet), joined (copied onto its pairs), orphaned (still
    no pair after ``label_window_s``: reported by ``Store.orphan_labels``).
    """

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(255))
    label: Mapped[Any | None] = mapped_column(Json)
    ts: Mapped[float]
    received_at: Mapped[float]
    status: Mapped[str] = mapped_column(String(SHORT), default="pending")
    joined_at: Mapped[float | None]
    source: Mapped[str] = mapped_column(String(NAME), default="api")

    __table_args__ = (
        Index(None, "request_id"),
        Index(None, "status", "received_at"),
    )


class GateEvaluationRow(Base):
    __tablename__ = "gate_evaluations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    gate: Mapped[str] = mapped_column(String(NAME))
    slice: Mapped[str] = mapped_column(String(NAME), default="")
    status: Mapped[str] = mapped_column(String(SHORT))  # pass | inconclusive | fail
    statistic: Mapped[float | None]
    threshold: Mapped[float | None]
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    confidence: Mapped[float | None]
    method: Mapped[str] = mapped_column(Text, default="")
    ts: Mapped[float]
    details: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (Index(None, "rollout_id", "gate", "slice", "ts"), Index(None, "ts"))


class DecisionRow(Base):
    """A verdict or stage change, by the engine or an operator. Never purged."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    verdict: Mapped[str] = mapped_column(String(SHORT))  # continue | promote | abort | pause...
    from_stage: Mapped[str | None] = mapped_column(String(SHORT))
    to_stage: Mapped[str | None] = mapped_column(String(SHORT))
    reason: Mapped[str] = mapped_column(Text, default="")
    actor_kind: Mapped[str] = mapped_column(String(16))  # engine | operator
    actor: Mapped[str] = mapped_column(String(NAME))
    ts: Mapped[float]
    evidence: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (Index(None, "rollout_id", "ts"),)


class PinnedFailureRow(Base):
    """A harvested failure; one row per (task, inputs digest), recurrences counted.

    ``task`` names what is predicted (the served model name), so a case outlives the
    champion and candidate versions that produced its evidence.
    """

    __tablename__ = "pinned_failures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(NAME))
    inputs_digest: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(SHORT), default="candidate")
    rule: Mapped[str] = mapped_column(String(NAME))
    inputs: Mapped[bytes | None] = mapped_column(Blob)
    champion_output: Mapped[bytes | None] = mapped_column(Blob)
    candidate_output: Mapped[bytes | None] = mapped_column(Blob)
    champion_error: Mapped[str | None] = mapped_column(Text)
    candidate_error: Mapped[str | None] = mapped_column(Text)
    # The evidence's output descriptors, as pairs keep them (migration 0004).
    champion_output_name: Mapped[str | None] = mapped_column(String(NAME))
    champion_datatype: Mapped[str | None] = mapped_column(String(SHORT))
    champion_shape: Mapped[Any | None] = mapped_column(Json)
    candidate_output_name: Mapped[str | None] = mapped_column(String(NAME))
    candidate_datatype: Mapped[str | None] = mapped_column(String(SHORT))
    candidate_shape: Mapped[Any | None] = mapped_column(Json)
    label: Mapped[Any | None] = mapped_column(Json)
    slices: Mapped[dict[str, Any] | None] = mapped_column(Json)
    request_id: Mapped[str] = mapped_column(String(255), default="")
    rollout_id: Mapped[str | None] = mapped_column(ForeignKey("rollouts.id"))
    champion_identity: Mapped[dict[str, Any] | None] = mapped_column(Json)
    candidate_identity: Mapped[dict[str, Any] | None] = mapped_column(Json)
    seen_at: Mapped[float]  # when the evidence was observed
    first_seen: Mapped[float]
    last_seen: Mapped[float]
    recurrence_count: Mapped[int] = mapped_column(Integer, default=1)
    expected_label: Mapped[Any | None] = mapped_column(Json)
    score_tolerance: Mapped[float | None]
    updated_at: Mapped[float]

    __table_args__ = (
        UniqueConstraint("task", "inputs_digest"),
        Index(None, "status", "last_seen"),
    )


class PinnedTriageRow(Base):
    """Every status change of a pinned failure: who, why, from, to, when."""

    __tablename__ = "pinned_triage"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    pinned_id: Mapped[int] = mapped_column(ForeignKey("pinned_failures.id"))
    actor: Mapped[str] = mapped_column(String(NAME))
    reason: Mapped[str] = mapped_column(Text, default="")
    from_status: Mapped[str | None] = mapped_column(String(SHORT))
    to_status: Mapped[str] = mapped_column(String(SHORT))
    expected_label: Mapped[Any | None] = mapped_column(Json)
    score_tolerance: Mapped[float | None]
    ts: Mapped[float]

    __table_args__ = (Index(None, "pinned_id", "ts"),)


class BaselineRow(Base):
    """A reference (drift distributions, metric levels). Append-only: the current one for
    a name is the latest row; moving it is a new row with who and why."""

    __tablename__ = "baselines"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME))
    rollout_id: Mapped[str | None] = mapped_column(ForeignKey("rollouts.id"))
    data: Mapped[dict[str, Any] | None] = mapped_column(Json)
    actor: Mapped[str] = mapped_column(String(NAME))
    reason: Mapped[str] = mapped_column(Text, default="")
    ts: Mapped[float]
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    __table_args__ = (Index(None, "name", "ts"),)


class SignOffRow(Base):
    __tablename__ = "signoffs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    reviewer: Mapped[str] = mapped_column(String(NAME))
    decision: Mapped[str] = mapped_column(String(SHORT))  # approve | reject
    report_digest: Mapped[str] = mapped_column(String(128), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    ts: Mapped[float]

    __table_args__ = (Index(None, "rollout_id", "ts"),)


class GateSnapshotRow(Base):
    """A replica's serialized gate state for one window: merged across replicas later."""

    __tablename__ = "gate_snapshots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    replica_id: Mapped[str] = mapped_column(String(NAME))
    window_start: Mapped[float]
    window_end: Mapped[float]
    state: Mapped[dict[str, Any] | None] = mapped_column(Json)
    ts: Mapped[float]

    __table_args__ = (
        UniqueConstraint("rollout_id", "replica_id", "window_start"),
        Index(None, "rollout_id", "ts"),
    )


# Core tables of the hot paths (bulk insert/update without the ORM's per-row work).
PAIRS = cast(Table, PairRow.__table__)
LABELS = cast(Table, LabelRow.__table__)
