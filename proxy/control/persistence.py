"""The served proxy's storage: database, rollout row, recorder — and the evidence writes.

Opened at start-up (schema checked or upgraded before the socket serves, so a proxy on an
outdated schema refuses to start with the reason), attached once the models are loaded
(their file digests identify the rollout), closed last on shutdown (the recorder flushes).
The evidence writes are blocking Store calls; the rollout service runs them in threads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from gates.engine import Decision, Evaluation
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import ConfigError
from proxy.protocol.base import Backend
from storage.db import Database, normalize_url
from storage.entities import Decision as StoredDecision
from storage.entities import GateEvaluation, GateSnapshot, ModelInfo, Rollout
from storage.errors import SchemaError, StorageError
from storage.migrate import open_database
from storage.recorder import SqlRecorder
from storage.replicas import RESUME_ID
from storage.store import Store

log = logging.getLogger(__name__)

_ROLLOUT_STATUS = {"promote": "promoted", "abort": "aborted"}
# The revision judged before any controller started a rollout.
INITIAL_REVISION = "initial"
# gate_snapshots.replica_id of a single proxy's resume state (replicas skip it).
RESUME_SNAPSHOT = RESUME_ID


def revision_of(rollout: Rollout) -> str:
    return str(rollout.extra.get("revision") or INITIAL_REVISION)


@dataclass
class Persistence:
    config: MirrorgateConfig
    db: Database
    store: Store
    registry: CollectorRegistry
    rollout: Rollout | None = None
    recorder: SqlRecorder | None = None
    champion_info: ModelInfo | None = None
    candidate_info: ModelInfo | None = None
    _last_stage: str | None = field(default=None, repr=False)

    @classmethod
    async def open(cls, config: MirrorgateConfig, registry: CollectorRegistry) -> Persistence:
        where = _display_url(config.storage.url)
        try:
            db = await asyncio.to_thread(open_database, config.storage)
        except (SchemaError, StorageError) as exc:
            raise ConfigError(f"storage {where}: {exc}") from exc
        except Exception as exc:
            # An unreachable server or an unwritable file: the proxy cannot keep its
            # promise to record, so it refuses to start with the reason (exit code 2).
            raise ConfigError(
                f"storage {where}: cannot open the database: {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
        return cls(config=config, db=db, store=Store(db), registry=registry)

    async def attach(self, champion: Backend, candidate: Backend | None) -> SqlRecorder:
        """Resume the rollout of these models (or open the first one); start the recorder.

        A restart resumes the newest rollout of the same experiment whatever its status:
        an aborted candidate stays aborted until a person starts a new rollout. A new
        one opens only for a first start or when ``lifecycle.revision`` names another
        revision than the newest rollout's.
        """
        self.champion_info = ModelInfo.of(champion.identity)
        self.candidate_info = ModelInfo.of(candidate.identity) if candidate is not None else None
        self.rollout = await asyncio.to_thread(self._resume_or_start)
        log.info(
            "recording rollout %s (revision %s, %s)",
            self.rollout.id,
            revision_of(self.rollout),
            self.rollout.status,
        )
        self.recorder = SqlRecorder(
            self.db, self.rollout.id, self.config.storage, registry=self.registry
        )
        await self.recorder.start()
        return self.recorder

    def _resume_or_start(self) -> Rollout:
        assert self.champion_info is not None, "attach() sets the models first"
        wanted = self.config.lifecycle.revision
        latest = self.store.latest_rollout(
            self.champion_info,
            self.candidate_info,
            config_digest=self.config.digest(),
            task=self.config.server.model_name,
        )
        if latest is not None and (wanted is None or revision_of(latest) == wanted):
            return latest
        # join_existing: replicas starting together all land on the first one's row
        return self._start(wanted or INITIAL_REVISION, {"started_by": "config"}, join=True)

    def _start(self, revision: str, extra: dict[str, Any], *, join: bool = False) -> Rollout:
        assert self.champion_info is not None, "attach() sets the models first"
        return self.store.start_rollout(
            self.champion_info,
            self.candidate_info,
            revision=revision,
            config_digest=self.config.digest(),
            task=self.config.server.model_name,
            stage=self.config.rollout.stages[0].name,
            extra=extra,
            join_existing=join,
        )

    def start_rollout(self, revision: str, extra: dict[str, Any], *, verdict: str) -> Rollout:
        """Blocking: end the current rollout and start one for ``revision``; pairs
        recorded from now on belong to it. ``verdict`` is the current rollout's live
        verdict (its row may lag one evaluation): a promote or abort is kept as its
        status, an undecided rollout ends (``ended``)."""
        previous = self.rollout
        if previous is not None:
            self.store.update_rollout(
                previous.id,
                status=_ROLLOUT_STATUS.get(verdict, "ended"),
                extra={"superseded_by_revision": revision},
            )
        rollout = self._start(revision, extra)
        self.switch(rollout)
        return rollout

    def switch(self, rollout: Rollout) -> None:
        self.rollout = rollout
        self._last_stage = None
        if self.recorder is not None:
            self.recorder.rollout_id = rollout.id

    def close_rollout(self, extra: dict[str, Any], *, verdict: str) -> Rollout:
        """Blocking: the controller's post-rollout hook. An undecided rollout ends
        (``ended``); a promoted or aborted one keeps that status (``verdict`` is the
        live one). Its verdict stays."""
        status = _ROLLOUT_STATUS.get(verdict, "ended")
        self.rollout = self.store.update_rollout(self.rollout_id, status=status, extra=extra)
        return self.rollout

    def refresh(self) -> Rollout:
        """Blocking: re-read the current rollout's row (status, stage, extra)."""
        self.rollout = self.store.get_rollout(self.rollout_id)
        return self.rollout

    def load_resume(self) -> tuple[dict[str, Any] | None, list[Decision]]:
        """Blocking: the last saved engine state of the current rollout and every
        decision recorded for it (replayed over the state: a decision whose state save
        failed is still applied)."""
        snapshots = [
            s for s in self.store.gate_snapshots(self.rollout_id) if s.replica_id == RESUME_SNAPSHOT
        ]
        state = snapshots[-1].state if snapshots else None
        decisions = [engine_decision(d) for d in self.store.decisions(self.rollout_id)]
        return state, decisions

    def save_state(self, state: dict[str, Any], now: float) -> None:
        """Blocking: the engine's resume state (one row per rollout, replaced)."""
        self.store.save_gate_snapshot(
            GateSnapshot(
                rollout_id=self.rollout_id,
                replica_id=RESUME_SNAPSHOT,
                window_start=0.0,
                window_end=now,
                state=state,
                ts=now,
            )
        )

    @property
    def rollout_id(self) -> str:
        if self.rollout is None:
            raise RuntimeError("no rollout attached yet")
        return self.rollout.id

    # ------------------------------------------------------------------ evidence

    def record_evaluation(self, evaluation: Evaluation) -> None:
        self.store.record_gate_evaluations(self.rollout_id, gate_rows(evaluation))
        if evaluation.stage != self._last_stage or evaluation.verdict in _ROLLOUT_STATUS:
            self._last_stage = evaluation.stage
            updated = self.store.update_rollout(
                self.rollout_id,
                stage=evaluation.stage,
                status=_ROLLOUT_STATUS.get(evaluation.verdict),
            )
            if self.rollout is not None and updated.id == self.rollout.id:
                self.rollout = updated  # not if a new rollout started meanwhile

    def record_decision(self, decision: Decision) -> None:
        self.store.record_decision(self.rollout_id, stored_decision(decision))

    async def aclose(self) -> None:
        if self.recorder is not None:
            await self.recorder.aclose()
        await asyncio.to_thread(self.db.dispose)


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _finite(float(value))
    if value is None or isinstance(value, str):
        return value
    return str(value)


def gate_rows(
    evaluation: Evaluation, *, extra: dict[str, object] | None = None
) -> list[GateEvaluation]:
    """The ``gate_evaluations`` rows of one evaluation (``extra`` joins each row's details)."""
    return [
        GateEvaluation(
            gate=g.name,
            slice=g.slice,
            status=g.status.value,
            statistic=_finite(g.statistic),
            threshold=_finite(g.threshold),
            n=int(g.n),
            method=f"{g.method.name}: {g.method.description}",
            ts=evaluation.ts,
            confidence=_finite(g.confidence),
            details={
                "reason": g.reason,
                "blocking": g.blocking,
                "insufficient": g.insufficient,
                "lower": _finite(lower),
                "upper": _finite(upper),
                "values": _plain(g.details),
                **(extra or {}),
            },
        )
        for g in evaluation.gates
        # The anytime-valid interval is computed lazily (``interval()``): storing it makes
        # the band of each metric over time readable from the database (the report's
        # series); the gate's own numbers (PSI, per-model rates, ...) go in ``values``.
        for lower, upper in [g.interval()]
    ]


def stored_decision(decision: Decision) -> StoredDecision:
    return StoredDecision(
        verdict=decision.action if decision.manual else decision.verdict,
        actor_kind="operator" if decision.manual else "engine",
        actor=decision.who,
        reason=decision.why,
        ts=decision.ts,
        from_stage=decision.from_stage,
        to_stage=decision.to_stage,
        evidence={
            "action": decision.action,
            "verdict": decision.verdict,
            "pairs": decision.pairs,
            "labels": decision.labels,
            "gates": decision.evidence,
        },
    )


def engine_decision(stored: StoredDecision) -> Decision:
    """A stored decision back as the engine's (what :func:`stored_decision` wrote)."""
    evidence = stored.evidence or {}
    return Decision(
        ts=stored.ts,
        action=str(evidence.get("action") or stored.verdict),
        verdict=evidence.get("verdict") or "continue",
        from_stage=stored.from_stage or "",
        to_stage=stored.to_stage or stored.from_stage or "",
        who=stored.actor,
        why=stored.reason,
        pairs=int(evidence.get("pairs") or 0),
        labels=int(evidence.get("labels") or 0),
        manual=stored.actor_kind == "operator",
        evidence=list(evidence.get("gates") or []),
    )


def _display_url(url: str) -> str:
    """The storage URL with its password masked: messages end up in logs."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except StorageError:
        return "<unparseable url>"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _finite(value: float | None) -> float | None:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)
