"""One line per rollout for ``mirrorgate rollouts list``: counts and the last verdict.

Three grouped queries (pairs, labelled pairs, last engine/operator verdict) over the
listed rollouts, instead of one query per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.entities import Rollout
from storage.schema import DecisionRow, PairRow
from storage.store import Store


@dataclass(frozen=True, slots=True)
class RolloutSummary:
    rollout: Rollout
    pairs: int
    labels: int
    verdict: str | None  # the last decision (engine verdict or operator action); None: none yet


def summaries(store: Store, *, status: str | None = None, limit: int = 100) -> list[RolloutSummary]:
    rollouts = store.list_rollouts(status=status, limit=limit)
    ids = [r.id for r in rollouts]
    if not ids:
        return []

    def go(conn: Session) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
        pairs = dict(
            conn.execute(
                select(PairRow.rollout_id, func.count())
                .where(PairRow.rollout_id.in_(ids))
                .group_by(PairRow.rollout_id)
            ).all()
        )
        labels = dict(
            conn.execute(
                select(PairRow.rollout_id, func.count())
                .where(PairRow.rollout_id.in_(ids), PairRow.label.is_not(None))
                .group_by(PairRow.rollout_id)
            ).all()
        )
        last = (
            select(DecisionRow.rollout_id, func.max(DecisionRow.id).label("id"))
            .where(DecisionRow.rollout_id.in_(ids))
            .group_by(DecisionRow.rollout_id)
            .subquery()
        )
        verdicts = dict(
            conn.execute(
                select(DecisionRow.rollout_id, DecisionRow.verdict).join(
                    last, DecisionRow.id == last.c.id
                )
            ).all()
        )
        return pairs, labels, verdicts

    pairs, labels, verdicts = store._run("summarise rollouts", go)
    return [
        RolloutSummary(r, pairs.get(r.id, 0), labels.get(r.id, 0), verdicts.get(r.id))
        for r in rollouts
    ]
