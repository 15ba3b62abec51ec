"""The online side of the gates: a pair sink that feeds the decision engine off the live path.

The proxy hands every pair to :meth:`RolloutService.submit` (a bounded append, never
blocking) and every label from ``POST /v1/feedback`` to :meth:`submit_labels`. A background
task drains both every ``tick_s`` into the same :class:`gates.runner.GateRunner` that
``mirrorgate replay`` drives, in one worker thread (the engine is not thread-safe and its
numpy work must not run on the event loop), then applies what the engine decided: the
canary weight and stage go to the mirror dispatcher, the gauges to Prometheus, and the
evaluations and decisions to storage (when configured) — each write in a thread, each
failure logged and counted, none able to touch a live response.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gates.engine import Decision, Evaluation, InvalidTransition, ManualAction, RolloutEngine
from gates.join import LabelEvent, LabelJoin
from gates.records import PairRecord
from gates.result import Status
from gates.runner import GateRunner
from proxy.control.engines import new_engine
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import Conflict
from proxy.core.metrics import ProxyMetrics
from proxy.core.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from proxy.control.replicas import ReplicaCoordinator

log = logging.getLogger(__name__)

# Pairs and labels waiting for the next tick. Past this the oldest are dropped and
# counted: the gates see a sample then, never a slower live path.
MAX_PENDING = 200_000
# How many of the latest unmatched labels GET /v1/rollout lists (all are counted).
UNMATCHED_SHOWN = 50


class RolloutHook(Protocol):
    """Extra work on the pairs the gates see, run in the gates' worker thread (off the
    live path, single-threaded with the engine, so it may call ``engine.pinned_result``).
    Each returns True to ask for an evaluation at once (e.g. a pinned case was missed)."""

    def on_pairs(self, records: list[PairRecord], engine: RolloutEngine, now: float) -> bool: ...

    def on_labelled(self, records: list[PairRecord], engine: RolloutEngine, now: float) -> bool: ...


class EvidenceStore(Protocol):
    """What the service persists through (``proxy.control.persistence.Persistence`` has it)."""

    def record_evaluation(self, evaluation: Evaluation) -> None: ...

    def record_decision(self, decision: Decision) -> None: ...


class ResumableStore(EvidenceStore, Protocol):
    """A store that can also bring a rollout back after a restart (single proxy)."""

    def load_resume(self) -> tuple[dict[str, Any] | None, list[Decision]]: ...

    def save_state(self, state: dict[str, Any], now: float) -> None: ...


@dataclass(slots=True)
class RolloutCounters:
    pairs_dropped: int = 0
    labels_dropped: int = 0
    persist_errors: int = 0
    evaluations: int = 0
    pairs_refused: int = 0  # pairs of an unjudged candidate identity (lifecycle: refuse)


# A decision write is retried this many times at once (with these pauses), then on every
# tick until it lands: an abort the database never saw would be forgotten by a restart.
DECISION_RETRY_PAUSES_S = (0.05, 0.2, 0.5)
# How often the engine's resume state is saved besides after every decision.
STATE_SAVE_EVERY_S = 5.0
# At most one log line per failing kind of write in this many seconds (a database
# outage otherwise writes a traceback per tick: ~5 a second, proxy/core/ratelog.py).
LOG_INTERVAL_S = 10.0


class DecisionObserver(Protocol):
    """Told about decisions that are not (yet) persisted (metrics, readiness)."""

    def decisions_unpersisted(self, n: int) -> None: ...

    def decision_persist_failed(self) -> None: ...

    def evaluated(self, evaluation: Evaluation) -> None: ...


class RolloutService:
    """PairSink + label intake + evaluation loop around one :class:`RolloutEngine`."""

    def __init__(
        self,
        config: MirrorgateConfig,
        *,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.2,
        apply: Callable[[Evaluation], None] | None = None,
        log_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        # Failures that repeat on every tick while the database is down (evaluation,
        # evidence, resume-state and decision writes) log one line per kind every
        # LOG_INTERVAL_S with the count suppressed since, not a traceback per tick.
        self.failures = RateLimitedLog(log, LOG_INTERVAL_S, clock=log_clock)
        self.metrics = metrics
        self.clock = clock
        self.tick_s = tick_s
        self.apply = apply
        self.store: EvidenceStore | None = None
        # The proxy knows its slice keys up front: the error budget is split over them,
        # not over the generic ``max_keys``. Built by the same factory as the replicas'
        # merged engine (proxy/control/engines.py), so both decide with the same budget.
        self.engine = new_engine(config, start_ts=clock())
        join = LabelJoin(label_window_s=config.storage.label_window_s)
        self.runner = GateRunner(
            self.engine, join, on_unmatched=self._unmatched, on_labelled=self._labelled
        )
        # Set by the app to its dispatcher's ``never_paired``: labels for requests whose
        # pair will never come (candidate stopped, not mirrored) do not wait in the join.
        self.never_paired: Callable[[str], bool] | None = None
        self.runner.never_paired = self._never_paired
        self.hooks: list[RolloutHook] = []
        self._hook_force = False
        self.counters = RolloutCounters()
        self._pairs: deque[PairRecord] = deque()
        self._labels: deque[LabelEvent] = deque()
        # One worker: the engine is single-threaded by contract.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirrorgate-gates")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self.latest: Evaluation | None = None
        # Several replicas (proxy/control/replicas.py): the local engine only accumulates
        # evidence; the coordinator's shared decision is what this replica serves.
        self.coordinator: ReplicaCoordinator | None = None
        # Rollout lifecycle (proxy/control/lifecycle.py): why judging is refused right now (the
        # candidate's identity changed under a running rollout), decisions waiting for
        # the database, and who hears about them.
        self.suspended: str | None = None
        self.unpersisted: deque[Decision] = deque()
        self.observer: DecisionObserver | None = None
        self._state_saved_at = 0.0
        self._step_lock = asyncio.Lock()

    # -------------------------------------------------------------- PairSink

    def submit(self, record: PairRecord) -> bool:
        if self.suspended is not None:
            # Not this rollout's candidate: its pairs must not count for (or against) it.
            self.counters.pairs_refused += 1
            return True
        if len(self._pairs) >= MAX_PENDING:
            self._pairs.popleft()
            self.counters.pairs_dropped += 1
        self._pairs.append(record)
        return True

    def submit_labels(self, labels: Sequence[LabelEvent]) -> None:
        for label in labels:
            if len(self._labels) >= MAX_PENDING:
                self._labels.popleft()
                self.counters.labels_dropped += 1
            self._labels.append(label)

    async def join_labels(self, labels: Sequence[LabelEvent]) -> list[str]:
        """Join labels now and say, per label, ``joined`` or ``pending``.

        ``joined``: its pair had reached the gates and is now labelled. ``pending``: no
        pair with that id yet — labels may legitimately arrive first (the candidate is
        still computing, or the client labels fast); it waits up to
        ``storage.label_window_s`` and, if no pair comes, is reported unmatched in
        :meth:`status`. Pairs already queued are taken in first, so a pair the proxy
        has emitted is never called missing. Not the live path: the control plane waits
        for the gates' worker here.
        """
        if self.coordinator is not None:
            # Several replicas: stored in the shared tables before the answer; the
            # decider's ledger feeds them to the gates (proxy/control/replicas.py).
            return await self.coordinator.store_labels(labels)
        if self._closing:
            self.submit_labels(labels)
            return ["pending"] * len(labels)
        pairs = _drain(self._pairs)
        queued = _drain(self._labels)
        now = self.clock()

        def work() -> list[str]:
            if pairs:
                self.runner.add_pairs(pairs, now)
            if queued:
                self.runner.add_labels(queued, now)
            # One batched update of the gates (a call per label would cost a gates update
            # per label), through the runner so the harvest hook sees these pairs too.
            matched = self.runner.join_labels(labels, now)
            joined = {record.id for record in matched}
            return [
                "joined"
                if label.id in joined
                else "not_gated"
                if self._never_paired(label.id)
                else "pending"
                for label in labels
            ]

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, work)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        """Take in what is queued, evaluate once more, persist; then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.coordinator is not None:
            try:
                await self.coordinator.aclose()
            except Exception:
                log.exception("closing the replica coordinator failed")
        self._pool.shutdown(wait=True)

    # -------------------------------------------------------------- lifecycle

    async def reset(
        self, start_ts: float, switch: Callable[[], Awaitable[T]] | None = None
    ) -> Evaluation:
        """A new rollout: a fresh engine (no evidence, first stage), queues emptied (the
        pairs and labels waiting belong to the previous candidate), judging resumed.

        ``switch`` (the storage's switch to the new rollout) runs with the engine swap
        while no evaluation is in flight, so no evaluation of one rollout is written
        under the other's id.
        """
        async with self._step_lock:
            if switch is not None:
                await switch()
            _drain(self._pairs)
            _drain(self._labels)

            def fresh() -> None:
                self._replace_engine(self._new_engine(start_ts))

            await self.in_gates(fresh)
        self.suspended = None
        self.latest = None
        self._state_saved_at = 0.0
        return await self._step(force=True)

    async def resume(self) -> Evaluation | None:
        """After a restart: the rollout's saved engine state with every recorded
        decision replayed over it, so its stage, evidence and verdict (an abort
        included) hold from the first request. Single proxy only (replicas restore
        from the shared decider state)."""
        store = self.store
        if self.coordinator is not None or store is None or not hasattr(store, "load_resume"):
            return None
        resumable: ResumableStore = store  # type: ignore[assignment]
        try:
            state, decisions = await asyncio.to_thread(resumable.load_resume)
        except Exception:
            # The rollout starts over from its first stage rather than not at all; the
            # decisions table still holds what was decided.
            log.exception("resuming the rollout's state failed: starting from scratch")
            return None

        def restore() -> int:
            engine = self.engine
            if state:
                try:
                    engine = RolloutEngine.from_state(
                        state, self.engine.settings, self.config.rollout
                    )
                except (KeyError, TypeError, ValueError):
                    log.exception("the saved engine state is unusable: replaying decisions")
            replay = decisions[len(engine.decisions) :]
            for decision in replay:
                engine._apply(decision)
                engine.decisions.append(decision)
            self._replace_engine(engine)
            return len(replay)

        replayed = await self.in_gates(restore)
        if decisions or state:
            log.info(
                "resumed the rollout: stage %s, verdict %s (%d decisions, %d replayed)",
                self.engine.stage.name,
                self.engine.verdict,
                len(decisions),
                replayed,
            )
        self.latest = None
        return await self._step(force=True)

    def _new_engine(self, start_ts: float) -> RolloutEngine:
        # The one factory (proxy/control/engines.py): replicas' merged engine is built the same way.
        return new_engine(self.config, start_ts=start_ts)

    def _replace_engine(self, engine: RolloutEngine) -> None:
        # On the gates' thread: the runner owns the label join, which goes with it.
        self.engine = engine
        join = LabelJoin(label_window_s=self.config.storage.label_window_s)
        self.runner = GateRunner(
            engine, join, on_unmatched=self._unmatched, on_labelled=self._labelled
        )
        self.runner.never_paired = self._never_paired

    # -------------------------------------------------------------- control

    async def evaluate_now(self) -> Evaluation:
        """Drain what is queued and evaluate at once (control plane, tests)."""
        if self.coordinator is not None:
            await self._step(force=True)
            await self.coordinator.sync(force=True)
            return self.current()
        return await self._step(force=True)

    async def manual(self, action: ManualAction, who: str, why: str) -> Evaluation:
        if self.coordinator is not None:
            try:
                return await self.coordinator.manual(action, who, why)
            except InvalidTransition as exc:
                raise Conflict(str(exc)) from exc
        loop = asyncio.get_running_loop()
        now = self.clock()
        try:
            decision = await loop.run_in_executor(
                self._pool, self.engine.manual, action, who, why, now
            )
        except InvalidTransition as exc:
            raise Conflict(str(exc)) from exc
        await self._persist_decision(decision)
        return await self._step(force=True)

    async def call(self, fn: Callable[[RolloutEngine], T]) -> T:
        """Run ``fn(engine)`` in the gates' worker thread (the engine is single-threaded)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, self.engine)

    def current(self) -> Evaluation:
        """The latest evaluation (an empty rollout's first look when none ran yet)."""
        if self.latest is None:
            if self.coordinator is not None:
                # Before the first shared decision: a fresh rollout's first look, never
                # the local engine's (it must not decide anything in this mode).
                fresh = new_engine(self.config, start_ts=self.coordinator.start_ts)
                return fresh.evaluate(self.clock())
            self.latest = self.engine.evaluate(self.clock())
        return self.latest

    def verdict_body(self) -> dict[str, Any]:
        """``GET /v1/rollout/verdict``. Several replicas: the shared decision's own body
        plus its sequence number, identical on every replica that serves that ``seq``
        (nothing per-replica is mixed in)."""
        body = self.current().verdict_dict()
        if self.coordinator is not None:
            body["seq"] = self.coordinator.seen_seq
        return body

    def adopt(self, evaluation: Evaluation) -> None:
        """Serve and apply an evaluation decided elsewhere (the replicas' decider)."""
        self.latest = evaluation
        self._apply(evaluation)

    async def in_gates(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the gates' worker thread (the engine's only thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # -------------------------------------------------------------- loop

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            closing = self._closing
            try:
                await self._step(force=closing)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The gates must never take the proxy down; the next tick tries again.
                self.failures.log(
                    "evaluate", logging.ERROR, "gate evaluation failed", exc_info=True
                )
            if closing:
                return

    async def _step(self, *, force: bool) -> Evaluation:
        async with self._step_lock:
            return await self._step_locked(force=force)

    async def _step_locked(self, *, force: bool) -> Evaluation:
        pairs = _drain(self._pairs)
        labels = _drain(self._labels)
        now = self.clock()
        loop = asyncio.get_running_loop()
        evaluation = await loop.run_in_executor(
            self._pool, self._advance, pairs, labels, now, force
        )
        if evaluation is not None:
            self.counters.evaluations += 1
            self.latest = evaluation
            self._apply(evaluation)
            await self._persist(evaluation)
        if self.unpersisted:
            await self._retry_unpersisted()
        if self.coordinator is None and (
            (evaluation is not None and evaluation.decision is not None)
            or now - self._state_saved_at >= STATE_SAVE_EVERY_S
        ):
            await self._save_state(now)
        return self.latest if self.latest is not None else self.current()

    async def _save_state(self, now: float) -> None:
        store = self.store
        if store is None or not hasattr(store, "save_state"):
            return
        resumable: ResumableStore = store  # type: ignore[assignment]
        self._state_saved_at = now
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(self._pool, self.engine.state_dict)
        try:
            await asyncio.to_thread(resumable.save_state, state, now)
        except Exception:
            # The decisions table is the durable record; the state only saves evidence.
            self.failures.log(
                "save_state",
                logging.WARNING,
                "saving the rollout's resume state failed",
                exc_info=True,
            )

    def _advance(
        self, pairs: list[PairRecord], labels: list[LabelEvent], now: float, force: bool
    ) -> Evaluation | None:
        self._hook_force = False
        if self.coordinator is not None:
            # Several replicas: the local engine takes the pairs' own evidence for this
            # replica's snapshot; labels never join here (held in memory, they would
            # die with the process): the decider's ledger joins them from the shared
            # tables. Never evaluates: the shared decision is what this replica serves.
            if pairs:
                self.engine.observe(pairs)
                for hook in self.hooks:
                    self._call_hook(hook.on_pairs, pairs, now)
            return None
        if pairs:
            self.runner.add_pairs(pairs, now)
            for hook in self.hooks:
                self._hook_force |= self._call_hook(hook.on_pairs, pairs, now)
        if labels:
            self.runner.add_labels(labels, now)
        force = force or self._hook_force
        if not force and self._unchanged_since_end():
            # An ended rollout evaluated on the same evidence says the same thing: no new
            # gate_evaluations row every evaluate_every_s for as long as the proxy lives
            # (the replicas' decider skips it the same way). The join still expires.
            self.runner.expire(now)
            return None
        return self.runner.tick(now, force=force)

    def _unchanged_since_end(self) -> bool:
        """Promoted or aborted, and the evidence (pairs, labelled pairs) is what the last
        evaluation counted. Pairs still mirrored after an abort (shadow_after_abort) or a
        label arriving late are a change: evaluated at the usual cadence."""
        last = self.latest
        if self.engine.terminal is None or last is None:
            return False
        return (self.engine.pairs, self.engine.labels) == (last.pairs, last.labels)

    def labelled_elsewhere(self, records: list[PairRecord]) -> None:
        """Labelled pairs the replicas' decider fed to the gates: the hooks (harvest)
        see each once, on the decider. In the gates' worker thread."""
        self._labelled(records)

    def _labelled(self, records: list[PairRecord]) -> None:
        now = self.clock()
        for hook in self.hooks:
            self._hook_force |= self._call_hook(hook.on_labelled, records, now)

    def _call_hook(
        self,
        fn: Callable[[list[PairRecord], RolloutEngine, float], bool],
        records: list[PairRecord],
        now: float,
    ) -> bool:
        try:
            return bool(fn(records, self.engine, now))
        except Exception:
            # A hook (harvest) must never stop the gates.
            self.failures.log(
                f"hook:{getattr(fn, '__qualname__', type(fn).__name__)}",
                logging.ERROR,
                "rollout hook %r failed",
                fn,
                exc_info=True,
            )
            return False

    def _apply(self, evaluation: Evaluation) -> None:
        if evaluation.verdict == "promote":
            # What the candidate serves after a promote is configured (default 0: the
            # controller switches the stable service; the proxy keeps the champion).
            evaluation = dataclasses.replace(
                evaluation, canary_weight=self.config.lifecycle.canary_weight_after_promote
            )
            self.latest = evaluation
        if self.metrics is not None:
            self.metrics.set_samples(evaluation.metric_samples())
        if self.observer is not None:
            self.observer.evaluated(evaluation)
        if self.apply is not None:
            self.apply(evaluation)
        if evaluation.decision is not None:
            d = evaluation.decision
            log.info("rollout %s: %s -> %s (%s)", d.action, d.from_stage, d.to_stage, d.why)

    async def _persist(self, evaluation: Evaluation) -> None:
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.store.record_evaluation, evaluation)
        except Exception:
            self.counters.persist_errors += 1
            self.failures.log(
                "persist_evaluation",
                logging.ERROR,
                "persisting a gate evaluation failed",
                exc_info=True,
            )
        if evaluation.decision is not None:
            await self._persist_decision(evaluation.decision)

    async def _persist_decision(self, decision: Decision) -> None:
        """Write a decision, retrying: at once a few times, then on every tick until it
        lands (in order: a later decision waits behind an earlier one). Until then it
        is reported in readiness, the log and ``mirrorgate_rollout_decisions_unpersisted``.
        """
        if self.store is None:
            return
        if self.unpersisted:
            self.unpersisted.append(decision)
            self._report_unpersisted()
            return
        if not await self._write_decision(decision, DECISION_RETRY_PAUSES_S):
            self.unpersisted.append(decision)
            self._report_unpersisted()
            log.error(
                "decision %s (%s) is NOT persisted yet: retrying every %.1f s; a restart "
                "before it lands would forget it",
                decision.action,
                decision.why[:200],
                self.tick_s,
            )

    async def _write_decision(self, decision: Decision, pauses: Sequence[float]) -> bool:
        assert self.store is not None
        for attempt, pause in enumerate((*pauses, None)):
            try:
                await asyncio.to_thread(self.store.record_decision, decision)
                return True
            except Exception:
                self.counters.persist_errors += 1
                if self.observer is not None:
                    self.observer.decision_persist_failed()
                # Retried on every tick until it lands: rate-limited (the decision's own
                # "NOT persisted yet" error and its readiness header are not).
                self.failures.log(
                    "persist_decision",
                    logging.WARNING,
                    "persisting decision %s failed (attempt %d)",
                    decision.action,
                    attempt + 1,
                    exc_info=True,
                )
            if pause is not None:
                await asyncio.sleep(pause)
        return False

    async def _retry_unpersisted(self) -> None:
        while self.unpersisted:
            if not await self._write_decision(self.unpersisted[0], ()):
                break
            done = self.unpersisted.popleft()
            log.info("decision %s persisted after retrying", done.action)
        self._report_unpersisted()

    def _report_unpersisted(self) -> None:
        if self.observer is not None:
            self.observer.decisions_unpersisted(len(self.unpersisted))

    def _never_paired(self, request_id: str) -> bool:
        check = self.never_paired
        return check is not None and check(request_id)

    def _unmatched(self, labels: list[tuple[LabelEvent, str]]) -> None:
        for event, reason in labels[:20]:
            log.warning("label for %r never met its pair: %s", event.id, reason)
        if len(labels) > 20:
            log.warning("... and %d more unmatched labels", len(labels) - 20)

    def status(self) -> dict[str, Any]:
        evaluation = self.current()
        body = evaluation.to_dict()
        body["queues"] = {
            "pairs_pending": len(self._pairs),
            "labels_pending": len(self._labels),
            "pairs_dropped": self.counters.pairs_dropped,
            "labels_dropped": self.counters.labels_dropped,
            "labels_unmatched": self.runner.unmatched_total,
            # the latest labels that never met their pair, with the reason
            "labels_unmatched_recent": [
                {"id": event.id, "reason": reason}
                for event, reason in list(self.runner.unmatched)[-UNMATCHED_SHOWN:]
            ],
            "join_pairs_waiting": self.runner.join.pending_pairs,
            "join_labels_waiting": self.runner.join.pending_labels,
            # labels whose pair will never be gated (stored, not kept waiting)
            "labels_not_gated": self.runner.join.stats.labels_not_gated,
        }
        if self.coordinator is not None:
            body["replica"] = self.coordinator.status()
        body["decisions_unpersisted"] = len(self.unpersisted)
        if self.suspended is not None:
            body["judging"] = {"refused": True, "reason": self.suspended}
        return body


T = TypeVar("T")


def _drain(queue: deque[T]) -> list[T]:
    items = list(queue)
    queue.clear()
    return items


def failing(evaluation: Evaluation) -> list[str]:
    return [g.label for g in evaluation.gates if g.blocking and g.status is Status.FAIL]
