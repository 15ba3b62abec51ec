"""Several replicas decide exactly as one proxy: the decider's label ledger.

Revision ID: 0002_replicas_exact
Revises: 0001
Create Date: 2026-12-06

``pairs.gated_seq``: the decider step that fed a labelled pair to the rollout's gates
(storage/replicas.py). Owned by the rollout, not by the replica that recorded the pair,
so a label reaches the gates exactly once whichever replica is alive. The partial index
holds only labelled pairs not yet fed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_replicas_exact"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNGATED = sa.text("label IS NOT NULL AND gated_seq IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.add_column(sa.Column("gated_seq", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_pairs_ungated",
        "pairs",
        ["rollout_id", "id"],
        postgresql_where=UNGATED,
        sqlite_where=UNGATED,
    )


def downgrade() -> None:
    op.drop_index("ix_pairs_ungated", table_name="pairs")
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("gated_seq")
