"""Several replicas, one decision: snapshots, the label ledger, the decider lease.

Hooked into :class:`proxy.control.rollout.RolloutService` when ``replicas.enabled``
(docs/replicas.md):

* Every replica feeds its pairs into its *local* engine (built by ``proxy/control/engines.py``,
  exactly as a single proxy builds its own), which in this mode never evaluates. Every
  ``snapshot_every_s`` the replica saves that engine's **cumulative** state (one
  ``gate_snapshots`` row per replica life, replaced in place). The gates' merge is exact
  (sums of sufficient statistics), so the merge of the latest snapshot of every replica
  IS the state of one engine fed the union of their pairs.
* Labels never wait in a replica's memory: ``POST /v1/feedback`` on any replica commits
  them to the shared tables (joined to their pair there) before answering 202. The
  decider feeds labelled pairs to the gates from the ``pairs`` table, exactly once
  (``pairs.gated_seq``), and keeps that labelled evidence in its own state (the
  *ledger*): it belongs to the rollout, so a label reaches the gates whichever replica
  recorded the pair, received the label, died or restarted.
* The replica holding the decider lease (``storage.replicas.DeciderLease``) merges the
  snapshots and the ledger into an engine restored from the decider's own state (stage,
  pause, hold, past decisions, evaluation cadence), evaluates when the cadence is due,
  and writes evaluation rows, decisions, the rollout's stage and the new decider state
  in ONE transaction on the lease's session, fenced: the transaction first checks that
  this very session holds the advisory lock. Each evaluation carries a sequence
  number ``seq``.
* Every replica (the decider too) reads the decider state back and serves that very
  evaluation: ``/v1/rollout``, ``/v1/rollout/verdict``, the gauges and the canary weight
  are the same everywhere (up to one ``snapshot_every_s`` of lag); a (re)started replica
  adopts it before serving.
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
from gates.records import PairRecord
from gates.result import GateResult, Method, Status
from gates.settings import GatesSettings, RolloutSettings, Task
from proxy.control.engines import engine_from_state, gate_settings, gate_task, new_engine
from proxy.control.persistence import Persistence, gate_rows, stored_decision
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import ConfigError
from storage.entities import GateSnapshot, LabelEntry
from storage.errors import StorageError
from storage.replicas import (
    DeciderLease,
    StepWrite,
    read_decider,
    require_postgres,
    run_step,
    store_labels,
    sweep_labels,
)

if TYPE_CHECKING:
    from proxy.control.rollout import RolloutService

log = logging.getLogger(__name__)

DECIDER_STATE_VERSION = 1
# Input drift collects its reference from the first pairs each replica sees: replicas'
# references differ, so its states merge only while they agree (docs/replicas.md).
UNMERGEABLE = "drift.input"
# Labelled pairs the decider feeds to the gates per step, oldest first. Not a cap: the
# next step takes the next ones (the ledger's partial index holds only those waiting).
LEDGER_BATCH = 20_000


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

    The evidence: every replica's cumulative snapshot (its pairs) and the decider's
    ledger (``decider["ledger"]``: the labelled pairs fed from the shared tables, owned
    by the rollout rather than by any replica). Stage counts restart where the
    decider's last advance left them: ``stage_pairs`` is the merged total minus the
    total at the stage's start.
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
    sources = [snap.state for snap in snapshots if snap.state]
    ledger = (decider or {}).get("ledger")
    for i, state in enumerate([ledger, *sources] if ledger else sources):
        other = RolloutEngine.from_state(state, gates, plan)
        for family, gate in engine.gates.items():
            if family == UNMERGEABLE:
                if ledger and i == 0:
                    continue  # the ledger holds labelled evidence only, no input drift
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


def decider_engine(
    config: MirrorgateConfig,
    decider: dict[str, Any] | None,
    snapshots: Sequence[GateSnapshot],
    *,
    start_ts: float,
) -> RolloutEngine:
    """The decider's engine built from the same settings as a single proxy's
    (proxy/control/engines.py): one decision function, whichever path runs it."""
    return merged_engine(
        decider,
        snapshots,
        gates=gate_settings(config),
        plan=config.rollout,
        task=gate_task(config),
        start_ts=start_ts,
    )


def control_state(engine: RolloutEngine) -> dict[str, Any]:
    """The engine without its gates (those come from the snapshots each step)."""
    return json_safe({**engine.state_dict(), "gates": {}})


def _unchanged_since_end(engine: RolloutEngine, decider: dict[str, Any] | None) -> bool:
    """The rollout has ended (promoted or aborted) and the merged evidence is what its
    last evaluation counted. Pairs still mirrored after an abort (shadow_after_abort) or
    labels still arriving are a change: those are evaluated at the usual cadence."""
    if engine.terminal is None:
        return False
    last = (decider or {}).get("evaluation") or {}
    return (engine.pairs, engine.labels) == (last.get("pairs"), last.get("labels"))


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
        failing_at_decision=(
            None if d.get("failing_at_decision") is None else tuple(d["failing_at_decision"])
        ),
    )


# ---------------------------------------------------------------------- coordinator


@dataclass(slots=True)
class ReplicaCounters:
    snapshots: int = 0
    steps: int = 0  # evaluations this replica wrote as the decider
    takeovers: int = 0
    errors: int = 0
    labels_gated: int = 0  # labelled pairs this replica fed to the gates as the decider


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

    async def join(self) -> None:
        """Adopt the fleet's decision before serving (a restart joins it in force).

        A database that does not answer here is not fatal: the first sync retries."""
        try:
            await self._follow()
        except StorageError as exc:
            log.warning("replica %s: cannot read the shared decision yet: %s", self.replica_id, exc)

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
            await self.snapshot()
            await self._lead(force=force)
            await self._follow()

    # ------------------------------------------------------------------ steps

    async def store_labels(self, events: Sequence[LabelEvent]) -> list[str]:
        """``POST /v1/feedback`` on any replica: labels stored (and joined to their pairs
        in the shared tables) before the answer, so a 202 means stored. Per label:
        ``joined`` (its pair is stored: the decider feeds it to the gates at its next
        step) or ``pending`` (no pair stored yet: it waits in the shared table).

        Labels never go through a replica's memory: whichever replica recorded the pair,
        whichever received the label and whichever is alive, the decider's ledger feeds
        each labelled pair to the rollout's gates exactly once (docs/replicas.md).
        """
        now = self.clock()
        entries = [
            LabelEntry(
                request_id=e.id,
                label=e.label,
                ts=now if e.ts is None else float(e.ts),
                received_at=now,
            )
            for e in events
        ]
        joined = await asyncio.to_thread(store_labels, self.db, entries, now=now)
        return ["joined" if e.id in joined else "pending" for e in events]

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
        # Labels whose pair landed in a concurrent transaction: joined now, fed below.
        await asyncio.to_thread(sweep_labels, self.db, now=now)
        try:
            result = await asyncio.to_thread(
                self.lease.step,
                self.rollout_id,
                lambda s, snaps, labelled: self._decide(s, snaps, labelled, now, force),
                ledger_batch=LEDGER_BATCH,
            )
        except StorageError as exc:
            if not self.lease.held:
                # Fenced: the step wrote nothing; this replica stops deciding now and
                # says so (status "decider": false) until it takes the lease again.
                log.warning(
                    "replica %s lost the decider lease of %s, stops deciding: %s",
                    self.replica_id,
                    self.rollout_id,
                    exc,
                )
                return
            raise
        if result.written and isinstance(result.result, Evaluation):
            self.counters.steps += 1
        if result.labelled:
            self.counters.labels_gated += len(result.labelled)
            # Harvest rules and other hooks see each labelled pair once, here (after
            # the commit), like a single proxy's join hands them to its hooks.
            await self.service.in_gates(lambda: self.service.labelled_elsewhere(result.labelled))

    def _engine(self, decider: dict[str, Any] | None, snaps: list[GateSnapshot]) -> RolloutEngine:
        return decider_engine(self.config, decider, snaps, start_ts=self.start_ts)

    def _decide(
        self,
        decider: dict[str, Any] | None,
        snaps: list[GateSnapshot],
        labelled: list[PairRecord],
        now: float,
        force: bool,
    ) -> StepWrite | None:
        engine = self._engine(decider, snaps)
        ledger = self._ledger(decider, labelled)
        if labelled:
            engine.observe_labelled(labelled)
        if not force and not labelled and _unchanged_since_end(engine, decider):
            # An ended rollout evaluated on the same evidence says the same thing: no
            # new gate_evaluations rows every evaluate_every_s for as long as it lives.
            return None
        if not (force or engine.due(now)):
            if not labelled:
                return None
            # Not due: only the ledger moves (same seq, same served evaluation).
            seq = int((decider or {}).get("seq", 0))
            return StepWrite(state={**(decider or {}), "ledger": ledger}, gated_seq=seq)
        return self._write(decider, engine, engine.evaluate(now), (), ledger=ledger)

    def _ledger(
        self, decider: dict[str, Any] | None, labelled: list[PairRecord]
    ) -> dict[str, Any] | None:
        """The rollout's labelled evidence with these pairs added (JSON-safe state)."""
        state = (decider or {}).get("ledger")
        if not labelled:
            return state
        engine = (
            engine_from_state(self.config, state)
            if state
            else new_engine(self.config, start_ts=self.start_ts)
        )
        engine.observe_labelled(labelled)
        result: dict[str, Any] = json_safe(engine.state_dict())
        return result

    def _write(
        self,
        decider: dict[str, Any] | None,
        engine: RolloutEngine,
        evaluation: Evaluation,
        manual: Sequence[Decision],
        *,
        ledger: dict[str, Any] | None,
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
            "ledger": ledger,
        }
        return StepWrite(
            state=state,
            evaluations=gate_rows(evaluation, extra={"seq": seq, "by": self.replica_id}),
            decisions=[stored_decision(d) for d in decisions],
            stage=evaluation.stage,
            verdict=evaluation.verdict,
            result=evaluation,
            gated_seq=seq,
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

        def decide(
            decider: dict[str, Any] | None, snaps: list[GateSnapshot], _: list[PairRecord]
        ) -> StepWrite:
            engine = self._engine(decider, snaps)
            decision = engine.manual(action, who, why, now)  # InvalidTransition: rollback
            ledger = (decider or {}).get("ledger")
            return self._write(decider, engine, engine.evaluate(now), [decision], ledger=ledger)

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
            "lease_lost": self.lease.lost,
            "errors": self.counters.errors,
            "labels_gated": self.counters.labels_gated,
        }
