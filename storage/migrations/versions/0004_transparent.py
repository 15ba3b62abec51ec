"""Pinned failures keep their evidence's output descriptors, as pairs do.

Revision ID: 0004_transparent
Revises: 0003_output_descriptors
Create Date: 2026-12-07

``pinned_failures.{champion,candidate}_{output_name,datatype,shape}``: the output
name, V2 datatype and per-row shape of the harvested pair, which 0003 added to
``pairs``; without them a pinned case read back (triage, suite, export) lost what its
outputs were. Nullable: cases harvested before this revision have no descriptor, which
every reader already treats as "not said".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004_transparent"
down_revision: str | None = "0003_output_descriptors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Json = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
SIDES = ("champion", "candidate")


def upgrade() -> None:
    with op.batch_alter_table("pinned_failures") as batch:
        for side in SIDES:
            batch.add_column(sa.Column(f"{side}_output_name", sa.String(200), nullable=True))
            batch.add_column(sa.Column(f"{side}_datatype", sa.String(32), nullable=True))
            batch.add_column(sa.Column(f"{side}_shape", Json, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pinned_failures") as batch:
        for side in SIDES:
            for column in ("output_name", "datatype", "shape"):
                batch.drop_column(f"{side}_{column}")
