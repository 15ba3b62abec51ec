"""Several replicas, one decision: snapshots, the decider lease, the shared verdict.

Hooked into :class:`proxy.rollout.RolloutService` when ``replicas.enabled`` (docs/replicas.md):

* Every replica keeps feeding its pairs and labels into its *local* engine, which in this
  mode never evaluates. Every ``snapshot_every_s`` the replica saves that engine's
  **cumulative** state (one ``gate_snapshots`` row per replica, replaced in place). The
  gates' merge is exact (sums of sufficient statistics), so the merge of the latest
  snapshot of every replica IS the state of one engine fed the union of their traffic;
  a replaced snapshot can neither be lost nor counted twice, and a dead replica's last
  snapshot keeps counting.
* The replica holding the decider lease (``storage.replicas.DeciderLease``) merges the
  snapshots into an engine restored from the decider's own state (stage, pause, hold,
  past decisions, evaluation cadence), evaluates when the cadence is due, and writes
  evaluation rows, decisions, the rollout's stage and the new decider state in ONE
  transaction on the lease's session. Each evaluation carries a sequence number ``seq``.
* Every replica (the decider too) reads the decider state back and serves that very
  evaluation: ``/v1/rollout``, ``/v1/rollout/verdict``, the gauges and the canary weight
  are the same everywhere (up to one ``snapshot_every_s`` of lag).
* Manual actions on any replica run the same transactional step (the decider row's
  ``FOR UPDATE`` lock serialises them with the decider).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gates.engine import Decision, Evaluation, ManualAction, RolloutEngine
from gates.join import LabelEvent
from gates.result import GateResult, Method, Status
from gates.settings import GatesSettings, RolloutSettings, Task
from proxy.config import MirrorgateConfig
from proxy.errors import ConfigError
from proxy.persistence import Persistence, gate_rows, stored_decision
from storage.entities import GateSnapshot
from storage.errors import StorageError
from storage.replicas import (
    DeciderLease,
    StepWrite,
    labels_for,
    read_decider,
    require_postgres,
    run_step,
)

if TYPE_CHECKING:
    from proxy.rollout import RolloutService

log = logging.getLogger(__name__)

DECIDER_STATE_VERSION = 1
# Input drift collects its reference from the first pairs each replica sees: replicas'
# references differ, so its states merge only while they agree (docs/replicas.md).
UNMERGEABLE = "drift.input"
# Pairs waiting for a label looked up in the shared labels table per sync, oldest first.
MAX_LABEL_LOOKUPS = 20_000


# ---------------------------------------------------------------------- pure parts


def merged_engine(
    decider: dict[str, Any] | None,
    snapshots: Sequence[GateSnapshot],
    *,
    gates: GatesSettings,
    plan: RolloutSettings,
    task: Task,
    start_ts: float,
) -> RolloutEngine:
    """The decider's engine: its stage machine, every replica's evidence merged in.

    Stage counts restart where the decider's last advance left them: ``stage_pairs`` is
    the merged total minus the total at the stage's start.
    """
    control = (decider or {}).get("engine")
    if control:
        engine = RolloutEngine.from_state({**control, "gates": {}}, gates, plan)
    else:
        engine = RolloutEngine(gates, plan, task=task, start_ts=start_ts)
    base_pairs = engine.pairs - engine.stage_pairs
    base_labels = engine.labels - engine.stage_labels
    pairs = labels = 0
    per_replica_reference = False
    for snap in snapshots:
        if not snap.state:
            continue
        other = RolloutEngine.from_state(snap.state, gates, plan)
        for family, gate in engine.gates.items():
            if family == UNMERGEABLE:
                if per_replica_reference:
                    continue
                try:
                    gate.merge(other.gates[family])
                except ValueError:
                    # Each replica froze its own automatic reference: no one union
                    # reference exists. The gate is a non-blocking warning; it reports
                    # nothing rather than a mix (docs/replicas.md).
                    per_replica_reference = True
                    engine.gates[family] = type(gate)(
                        gate.settings, alpha=gate.alpha, task=gate.task
                    )
                continue
            gate.merge(other.gates[family])
        pairs += other.pairs
        labels += other.labels
    engine.pairs, engine.labels = pairs, labels
    engine.stage_pairs = max(pairs - base_pairs, 0)
    engine.stage_labels = max(labels - base_labels, 0)
    return engine


def control_state(engine: RolloutEngine) -> dict[str, Any]:
    """The engine without its gates (those come from the snapshots each step)."""
    return json_safe({**engine.state_dict(), "gates": {}})


def json_safe(value: Any) -> Any:
    """Non-finite floats become null (PostgreSQL's JSONB has no Infinity/NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _f(value: Any, default: float) -> float:
    return default if value is None else float(value)


def gate_result_from_dict(d: dict[str, Any]) -> GateResult:
    return GateResult(
        name=str(d["name"]),
        slice=str(d["slice"]),
        status=Status(d["status"]),
        statistic=d.get("statistic"),
        threshold=d.get("threshold"),
        n=int(d["n"]),
        confidence=_f(d.get("confidence"), math.nan),
        method=Method(str(d["method"]), str(d.get("method_description", ""))),
        reason=str(d.get("reason", "")),
        blocking=bool(d.get("blocking", True)),
        lower=d.get("lower"),
        upper=d.get("upper"),
        insufficient=bool(d.get("insufficient", False)),
        details=dict(d.get("details") or {}),
    )


def evaluation_from_dict(d: dict[str, Any]) -> Evaluation:
    """Inverse of ``Evaluation.to_dict`` after :func:`json_safe` (followers serve it)."""
    progress = d["stage_progress"]
    return Evaluation(
        ts=float(d["ts"]),
        verdict=d["verdict"],
        stage=str(d["stage"]),
        stage_index=int(d["stage_index"]),
        stages=tuple(d["stages"]),
        canary_weight=float(d["canary_weight"]),
        reason=str(d["reason"]),
        pairs=int(d["pairs"]),
        labels=int(d["labels"]),
        stage_pairs=int(progress["pairs"]),
        stage_labels=int(progress["labels"]),
        stage_elapsed_s=float(progress["elapsed_s"]),
        stage_minimums={
            "min_pairs": _f(progress.get("min_pairs"), 0.0),
            "min_labels": _f(progress.get("min_labels"), 0.0),
            "min_duration_s": _f(progress.get("min_duration_s"), 0.0),
            "max_duration_s": _f(progress.get("max_duration_s"), math.inf),
        },
        paused=bool(d["paused"]),
        gates=[gate_result_from_dict(g) for g in d["gates"]],
        decision=None if d.get("decision") is None else Decision.from_dict(d["decision"]),
        decided_at=d.get("decided_at"),
        alpha=float(d["alpha"]),
    )


# ---------------------------------------------------------------------- coordinator


@dataclass(slots=True)
class ReplicaCounters:
    snapshots: int = 0
    steps: int = 0  # evaluations this replica wrote as the decider
    takeovers: int = 0
    errors: int = 0


class ReplicaCoordinator:
    def __init__(
        self,
        config: MirrorgateConfig,
        persistence: Persistence,
        service: RolloutService,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.replicas
        self.replica_id = self.settings.resolved_id()
        self.persistence = persistence
        self.service = service
        self.clock = clock
        self.db = persistence.db
        try:
            require_postgres(self.db)
        except StorageError as exc:
            raise ConfigError(f"replicas.enabled: {exc}") from exc
        rollout = persistence.rollout
        if rollout is None:
            raise RuntimeError("attach the rollout before starting the replica coordinator")
        self.rollout_id = rollout.id
        self.start_ts = rollout.created_at
        self.window_start = clock()
        self.lease = DeciderLease(self.db, self.settings.lease_name, self.rollout_id)
        self.counters = ReplicaCounters()
        self.seen_seq = 0
        self.leader_id: str | None = None
        self._next_try = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()

    @property
    def is_decider(self) -> bool:
        return self.lease.held

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        """Last snapshot (the service drained its queues first), last step, lease back."""
        self._closing = True
        self._stop.set()
        if self._task is not None:
            # Not cancelled: a step may be running in a thread on the lease's connection;
            # cancelling the await would leave it running under the last sync below.
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.sync()
        await asyncio.to_thread(self.lease.release)

    async def _loop(self) -> None:
        while not self._closing:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counters.errors += 1
                log.exception("replica %s: sync failed", self.replica_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.snapshot_every_s)

    async def sync(self, *, force: bool = False) -> None:
        """Snapshot, decide (when holding the lease) and adopt the shared decision."""
        async with self._lock:
            await self.pull_labels()
            await self.snapshot()
            await self._lead(force=force)
            await self._follow()

    # ------------------------------------------------------------------ steps

    async def pull_labels(self) -> int:
        """Labels other replicas received for pairs this one recorded.

        Behind a Service, ``POST /v1/feedback`` lands on any replica. The receiving one
        stores the label (the shared ``labels`` table); the replica that recorded the
        pair finds it here and joins it locally. Each label reaches the gates once:
        through the replica holding its pair, whichever replica received it.
        """
        service = self.service
        # pairs waiting at least one snapshot period: the local path had its chance
        before = self.clock() - self.settings.snapshot_every_s
        ids = await service.in_gates(
            lambda: service.runner.join.waiting_pair_ids(before, MAX_LABEL_LOOKUPS)
        )
        if not ids:
            return 0
        found = await asyncio.to_thread(labels_for, self.db, ids)
        if not found:
            return 0
        events = [LabelEvent(rid, label, None) for rid, label in found.items()]
        now = self.clock()
        return await service.in_gates(lambda: service.runner.add_labels(events, now))

    async def snapshot(self) -> None:
        state = await self.service.in_gates(self.service.engine.state_dict)
        now = self.clock()
        snap = GateSnapshot(
            rollout_id=self.rollout_id,
            replica_id=self.replica_id,
            window_start=self.window_start,
            window_end=now,
            state=json_safe(state),
            ts=now,
        )
        await asyncio.to_thread(self.persistence.store.save_gate_snapshot, snap)
        self.counters.snapshots += 1

    async def _lead(self, *, force: bool) -> None:
        now = self.clock()
        if not self.lease.held:
            if now < self._next_try:
                return
            self._next_try = now + self.settings.lease_retry_s
            if not await asyncio.to_thread(self.lease.try_acquire):
                return
            self.counters.takeovers += 1
            log.info("replica %s holds the decider lease of %s", self.replica_id, self.rollout_id)
        try:
            result = await asyncio.to_thread(
                self.lease.step,
                self.rollout_id,
                lambda s, snaps: self._decide(s, snaps, now, force),
            )
        except StorageError:
            if not self.lease.held:
                log.warning("replica %s lost the decider lease", self.replica_id)
            raise
        if result.written:
            self.counters.steps += 1

    def _engine(self, decider: dict[str, Any] | None, snaps: list[GateSnapshot]) -> RolloutEngine:
        return merged_engine(
            decider,
            snaps,
            gates=self.config.gates,
            plan=self.config.rollout,
            task=self.service.engine.task,
            start_ts=self.start_ts,
        )

    def _decide(
        self, decider: dict[str, Any] | None, snaps: list[GateSnapshot], now: float, force: bool
    ) -> StepWrite | None:
        engine = self._engine(decider, snaps)
        if not (force or engine.due(now)):
            return None
        return self._write(decider, engine, engine.evaluate(now), ())

    def _write(
        self,
        decider: dict[str, Any] | None,
        engine: RolloutEngine,
        evaluation: Evaluation,
        manual: Sequence[Decision],
    ) -> StepWrite:
        seq = int((decider or {}).get("seq", 0)) + 1
        decisions = [*manual]
        if evaluation.decision is not None:
            decisions.append(evaluation.decision)
        state = {
            "version": DECIDER_STATE_VERSION,
            "seq": seq,
            "by": self.replica_id,
            "engine": control_state(engine),
            "evaluation": json_safe(evaluation.to_dict()),
        }
        return StepWrite(
            state=state,
            evaluations=gate_rows(evaluation, extra={"seq": seq, "by": self.replica_id}),
            decisions=[stored_decision(d) for d in decisions],
            stage=evaluation.stage,
            verdict=evaluation.verdict,
            result=evaluation,
        )

    async def _follow(self) -> None:
        state = await asyncio.to_thread(read_decider, self.db, self.rollout_id)
        self._adopt(state)

    def _adopt(self, state: dict[str, Any] | None) -> None:
        if not state or not state.get("evaluation"):
            return
        seq = int(state.get("seq", 0))
        if seq == self.seen_seq and self.service.latest is not None:
            return
        self.seen_seq = seq
        self.leader_id = state.get("by")
        self.service.adopt(evaluation_from_dict(state["evaluation"]))

    async def manual(self, action: ManualAction, who: str, why: str) -> Evaluation:
        """An operator's action, on whichever replica received it (serialised in SQL)."""
        now = self.clock()

        def decide(decider: dict[str, Any] | None, snaps: list[GateSnapshot]) -> StepWrite:
            engine = self._engine(decider, snaps)
            decision = engine.manual(action, who, why, now)  # InvalidTransition: rollback
            return self._write(decider, engine, engine.evaluate(now), [decision])

        async with self._lock:
            result = await asyncio.to_thread(run_step, self.db, self.rollout_id, decide, now=now)
            self._adopt(result.state)
        assert isinstance(result.result, Evaluation)
        return result.result

    def status(self) -> dict[str, Any]:
        return {
            "id": self.replica_id,
            "decider": self.is_decider,
            "decided_by": self.leader_id,
            "seq": self.seen_seq,
            "snapshots": self.counters.snapshots,
            "steps": self.counters.steps,
            "takeovers": self.counters.takeovers,
            "errors": self.counters.errors,
        }
