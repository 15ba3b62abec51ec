"""Initial schema: rollouts, pairs, labels, gate evaluations and snapshots, decisions,
pinned failures and their triage, baselines, sign-offs.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

The column types are spelled out here (not imported from storage.schema) so this
revision stays what it was when later revisions change the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets JSONB and BYTEA.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
Blob = sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("label", Json, nullable=True),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("joined_at", sa.Double(), nullable=True),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
    )
    op.create_index(op.f("ix_labels_request_id"), "labels", ["request_id"])
    op.create_index(op.f("ix_labels_status_received_at"), "labels", ["status", "received_at"])

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("champion_name", sa.String(length=200), nullable=False),
        sa.Column("champion_kind", sa.String(length=32), nullable=False),
        sa.Column("champion_digest", sa.String(length=200), nullable=False),
        sa.Column("champion_device", sa.String(length=32), nullable=False),
        sa.Column("candidate_name", sa.String(length=200), nullable=True),
        sa.Column("candidate_kind", sa.String(length=32), nullable=True),
        sa.Column("candidate_digest", sa.String(length=200), nullable=True),
        sa.Column("candidate_device", sa.String(length=32), nullable=True),
        sa.Column("config_digest", sa.String(length=200), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("ended_at", sa.Double(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("extra", Json, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_status_created_at"), "rollouts", ["status", "created_at"])

    op.create_table(
        "baselines",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=True),
        sa.Column("data", Json, nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_baselines_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_baselines")),
    )
    op.create_index(op.f("ix_baselines_name_ts"), "baselines", ["name", "ts"])

    op.create_table(
        "decisions",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("from_stage", sa.String(length=32), nullable=True),
        sa.Column("to_stage", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor_kind", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("evidence", Json, nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_decisions_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    op.create_index(op.f("ix_decisions_rollout_id_ts"), "decisions", ["rollout_id", "ts"])

    op.create_table(
        "gate_evaluations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=False),
        sa.Column("gate", sa.String(length=200), nullable=False),
        sa.Column("slice", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("statistic", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=True),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("details", Json, nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_gate_evaluations_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gate_evaluations")),
    )
    op.create_index(
        op.f("ix_gate_evaluations_rollout_id_gate_slice_ts"),
        "gate_evaluations",
        ["rollout_id", "gate", "slice", "ts"],
    )
    op.create_index(op.f("ix_gate_evaluations_ts"), "gate_evaluations", ["ts"])

    op.create_table(
        "gate_snapshots",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=False),
        sa.Column("replica_id", sa.String(length=200), nullable=False),
        sa.Column("window_start", sa.Double(), nullable=False),
        sa.Column("window_end", sa.Double(), nullable=False),
        sa.Column("state", Json, nullable=True),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_gate_snapshots_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gate_snapshots")),
        sa.UniqueConstraint(
            "rollout_id",
            "replica_id",
            "window_start",
            name=op.f("uq_gate_snapshots_rollout_id_replica_id_window_start"),
        ),
    )
    op.create_index(op.f("ix_gate_snapshots_rollout_id_ts"), "gate_snapshots", ["rollout_id", "ts"])

    op.create_table(
        "pairs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("slices", Json, nullable=True),
        sa.Column("features", Json, nullable=True),
        sa.Column("inputs_digest", sa.String(length=128), nullable=False),
        sa.Column("inputs", Blob, nullable=True),
        sa.Column("champion_output", Blob, nullable=True),
        sa.Column("champion_latency_ms", sa.Double(), nullable=True),
        sa.Column("champion_error", sa.Text(), nullable=True),
        sa.Column("candidate_output", Blob, nullable=True),
        sa.Column("candidate_latency_ms", sa.Double(), nullable=True),
        sa.Column("candidate_error", sa.Text(), nullable=True),
        sa.Column("label", Json, nullable=True),
        sa.Column("label_ts", sa.Double(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("served_by", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_pairs_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairs")),
    )
    op.create_index(op.f("ix_pairs_request_id_rollout_id"), "pairs", ["request_id", "rollout_id"])
    op.create_index(op.f("ix_pairs_rollout_id_ts"), "pairs", ["rollout_id", "ts"])

    op.create_table(
        "pinned_failures",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("inputs_digest", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=False),
        sa.Column("inputs", Blob, nullable=True),
        sa.Column("champion_output", Blob, nullable=True),
        sa.Column("candidate_output", Blob, nullable=True),
        sa.Column("champion_error", sa.Text(), nullable=True),
        sa.Column("candidate_error", sa.Text(), nullable=True),
        sa.Column("label", Json, nullable=True),
        sa.Column("slices", Json, nullable=True),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=True),
        sa.Column("champion_identity", Json, nullable=True),
        sa.Column("candidate_identity", Json, nullable=True),
        sa.Column("seen_at", sa.Double(), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("recurrence_count", sa.Integer(), nullable=False),
        sa.Column("expected_label", Json, nullable=True),
        sa.Column("score_tolerance", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_pinned_failures_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pinned_failures")),
        sa.UniqueConstraint(
            "task", "inputs_digest", name=op.f("uq_pinned_failures_task_inputs_digest")
        ),
    )
    op.create_index(
        op.f("ix_pinned_failures_status_last_seen"), "pinned_failures", ["status", "last_seen"]
    )

    op.create_table(
        "signoffs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=200), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("report_digest", sa.String(length=128), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_signoffs_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signoffs")),
    )
    op.create_index(op.f("ix_signoffs_rollout_id_ts"), "signoffs", ["rollout_id", "ts"])

    op.create_table(
        "pinned_triage",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("pinned_id", BigId, nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("from_status", sa.String(length=32), nullable=True),
        sa.Column("to_status", sa.String(length=32), nullable=False),
        sa.Column("expected_label", Json, nullable=True),
        sa.Column("score_tolerance", sa.Double(), nullable=True),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pinned_id"],
            ["pinned_failures.id"],
            name=op.f("fk_pinned_triage_pinned_id_pinned_failures"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pinned_triage")),
    )
    op.create_index(op.f("ix_pinned_triage_pinned_id_ts"), "pinned_triage", ["pinned_id", "ts"])


def downgrade() -> None:
    op.drop_index(op.f("ix_pinned_triage_pinned_id_ts"), table_name="pinned_triage")

    op.drop_table("pinned_triage")
    op.drop_index(op.f("ix_signoffs_rollout_id_ts"), table_name="signoffs")

    op.drop_table("signoffs")
    op.drop_index(op.f("ix_pinned_failures_status_last_seen"), table_name="pinned_failures")

    op.drop_table("pinned_failures")
    op.drop_index(op.f("ix_pairs_rollout_id_ts"), table_name="pairs")
    op.drop_index(op.f("ix_pairs_request_id_rollout_id"), table_name="pairs")

    op.drop_table("pairs")
    op.drop_index(op.f("ix_gate_snapshots_rollout_id_ts"), table_name="gate_snapshots")

    op.drop_table("gate_snapshots")
    op.drop_index(op.f("ix_gate_evaluations_ts"), table_name="gate_evaluations")
    op.drop_index(
        op.f("ix_gate_evaluations_rollout_id_gate_slice_ts"), table_name="gate_evaluations"
    )

    op.drop_table("gate_evaluations")
    op.drop_index(op.f("ix_decisions_rollout_id_ts"), table_name="decisions")

    op.drop_table("decisions")
    op.drop_index(op.f("ix_baselines_name_ts"), table_name="baselines")

    op.drop_table("baselines")
    op.drop_index(op.f("ix_rollouts_status_created_at"), table_name="rollouts")

    op.drop_table("rollouts")
    op.drop_index(op.f("ix_labels_status_received_at"), table_name="labels")
    op.drop_index(op.f("ix_labels_request_id"), table_name="labels")

    op.drop_table("labels")
