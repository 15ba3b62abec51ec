"""Output descriptors survive the database: name, datatype and per-row shape per side.

Revision ID: 0003_output_descriptors
Revises: 0002_replicas_exact
Create Date: 2026-12-06

``pairs.{champion,candidate}_{output_name,datatype,shape}``: what the contract gate
compares (docs/gates.md); without them an exported rollout falls back to comparing
the outputs' shapes. Nullable: rows written before this revision have no descriptor,
which every reader already treats as "not said".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003_output_descriptors"
down_revision: str | None = "0002_replicas_exact"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
SIDES = ("champion", "candidate")


def upgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        for side in SIDES:
            batch.add_column(sa.Column(f"{side}_output_name", sa.String(200), nullable=True))
            batch.add_column(sa.Column(f"{side}_datatype", sa.String(32), nullable=True))
            batch.add_column(sa.Column(f"{side}_shape", Json, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        for side in SIDES:
            for column in ("output_name", "datatype", "shape"):
                batch.drop_column(f"{side}_{column}")
