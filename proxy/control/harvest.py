"""Online harvesting and the pinned gate, as a hook of the rollout service.

:class:`Harvester` runs in the gates' worker thread (``RolloutService.hooks``), never on
the live path:

* ``on_pairs``: every mirrored pair is checked against the pinned set (by inputs
  digest); a pinned case the candidate gets wrong goes to ``engine.pinned_result`` and
  asks for an evaluation at once, so the rollout aborts on the spot. The label-free
  harvest rules (``candidate_error``, ``disagreement``) run on the batch.
* ``on_labelled``: the ``wrong_label`` rule runs on newly labelled pairs.

Matches become :class:`storage.entities.HarvestedCase` (inputs from the record's capture
or the recorder's cache, both outputs, label, ts, slices, rollout, identities, rule) and
are written by ``Store.harvest_many`` on the harvester's own writer thread, up to
``BATCH`` cases per transaction (dedup by inputs digest, recurrences counted): a flood
of failures costs one commit per batch, never one per case (one transaction per case
took the GIL and CPU from the live loop). What reaches the queue is capped: per rule
``max_cases_per_window`` per ``window_s`` and ``max_cases_per_rollout`` in all (a dead
candidate turns every pair into ``candidate_error``: those must not flood the pinned
table), and the queue itself holds at most ``MAX_PENDING`` cases. Everything not stored
is counted by reason (``counters`` in ``GET /v1/rollout``,
``mirrorgate_harvest_cases_total{outcome}``), never queued without bound.

At rollout start (:meth:`check_candidate`, before the mirror activates) the candidate is
run over every pinned case; any miss aborts before a single request is mirrored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from gates.engine import RolloutEngine
from gates.harvest import LABEL_FREE, WRONG_LABEL, case_outcome, match_rules
from gates.records import Label, PairRecord
from gates.settings import HarvestSettings, Task
from proxy.control.rollout import RolloutService
from proxy.protocol.base import Backend
from proxy.suite.runner import case_name, judge
from storage.entities import HarvestedCase, ModelInfo, PinnedCase
from storage.recorder import SqlRecorder
from storage.store import Store

log = logging.getLogger(__name__)

MAX_PENDING = 1000  # harvested cases waiting for the database
BATCH = 200  # cases per transaction
FLUSH_S = 0.5  # a partial batch waits at most this long
OUTCOMES = (
    "harvested",
    "recurrence",
    "skipped_window",
    "skipped_rollout_cap",
    "dropped_queue_full",
    "write_error",
)
# Ids of pairs a label-free rule matched that may still be matched again by
# ``wrong_label`` when their label arrives (one case per pair, whatever the rules). A pair
# is labelled at most once (the join hands it over and forgets it), so its id is dropped
# then: what stays are matched pairs still waiting for a label, which the gates' join
# itself bounds (``max_pending_pairs``, 100,000, and the label window). This cap, the
# join's, is the backstop for pairs that never get a label. Before, every matched id was
# kept until 100,000 of them: ~16 MiB that a labelled soak filled over its first ~120k
# requests (docs/faults.md, "Round 5").
SEEN_IDS = 100_000


@dataclass(frozen=True, slots=True)
class Expectation:
    case_id: int
    expected: Label
    score_tolerance: float | None


@dataclass(slots=True)
class HarvestCounters:
    matched: int = 0
    harvested: int = 0
    recurrences: int = 0
    dropped: int = 0  # the write queue was full
    errors: int = 0  # cases in a batch the database did not take
    skipped_window: int = 0  # over max_cases_per_window for their rule
    skipped_rollout_cap: int = 0  # over max_cases_per_rollout
    pinned_checked: int = 0
    pinned_missed: int = 0


class Harvester:
    def __init__(
        self,
        store: Store,
        settings: HarvestSettings,
        *,
        task: str,
        gate_task: Task = "auto",
        rollout_id: str | None,
        champion: ModelInfo | None,
        candidate: ModelInfo | None,
        recorder: SqlRecorder | None = None,
        output_name: str | None = None,
        clock: Callable[[], float] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.task = task
        self.gate_task = gate_task
        self.rollout_id = rollout_id
        self.champion = champion
        self.candidate = candidate
        self.recorder = recorder
        self.output_name = output_name
        self.counters = HarvestCounters()
        # digest -> expectation; replaced whole (copy on write) so the worker thread
        # always reads a consistent map while triage updates it on the event loop.
        self.pinned: dict[str, Expectation] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._clock = clock or time.monotonic
        self._window_start = self._clock()
        self._window_counts: dict[str, int] = {}
        self._per_rollout: dict[str | None, int] = {}
        self._queue: deque[HarvestedCase] = deque()
        self._writing = 0
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._outcomes = Counter(
            "mirrorgate_harvest_cases_total",
            "Harvest matches by outcome: stored (harvested, recurrence) or not (why)",
            ["outcome"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        for outcome in OUTCOMES:
            self._outcomes.labels(outcome)

    # ------------------------------------------------------------------ pinned set

    def load_pinned(self) -> list[PinnedCase]:
        """Blocking: read the pinned cases of this task (with inputs) and index them."""
        cases = self.store.list_pinned(status="pinned", task=self.task, with_inputs=True)
        self.pinned = {
            c.inputs_digest: Expectation(c.id, c.expected_label, c.score_tolerance) for c in cases
        }
        return cases

    def update_case(self, case: PinnedCase) -> None:
        """After a triage: a pinned case joins the live check, any other leaves it."""
        if case.task != self.task:
            return
        pinned = dict(self.pinned)
        pinned.pop(case.inputs_digest, None)
        if case.status == "pinned":
            pinned[case.inputs_digest] = Expectation(
                case.id, case.expected_label, case.score_tolerance
            )
        self.pinned = pinned

    async def check_candidate(
        self, candidate: Backend, service: RolloutService, cases: list[PinnedCase]
    ) -> list[tuple[int, bool, str]]:
        """Run the candidate over the pinned cases; report each outcome to the engine and
        evaluate at once when any failed (the abort then precedes all mirroring)."""
        outcomes: list[tuple[int, bool, str]] = []
        for case in cases:
            if not case.inputs:
                log.warning("pinned case %d has no stored inputs: not replayable", case.id)
                continue
            outcome = await judge(
                candidate,
                case.inputs,
                case.expected_label,
                case.score_tolerance,
                output_name=self.output_name,
            )
            outcomes.append((case.id, outcome.passed, outcome.detail))
        if not outcomes:
            return outcomes
        now = service.clock()

        def report(engine: RolloutEngine) -> None:
            for cid, ok, detail in outcomes:
                engine.pinned_result(case_name(cid), ok, now=now, detail=f"at start: {detail}")

        await service.call(report)
        if not all(ok for _, ok, _ in outcomes):
            missed = [cid for cid, ok, _ in outcomes if not ok]
            log.warning("candidate misses pinned cases %s before any traffic: aborting", missed)
            await service.evaluate_now()
        return outcomes

    # ------------------------------------------------------------------ hooks (worker thread)

    def on_pairs(self, records: list[PairRecord], engine: RolloutEngine, now: float) -> bool:
        force = self._check_live(records, engine, now)
        self._harvest(
            records,
            match_rules(records, self.settings, task=self.gate_task, rules=LABEL_FREE),
            last_look=False,
        )
        return force

    def on_labelled(self, records: list[PairRecord], engine: RolloutEngine, now: float) -> bool:
        # A pair is labelled once: this is the last rule that can match it.
        self._harvest(
            records,
            match_rules(records, self.settings, task=self.gate_task, rules=(WRONG_LABEL,)),
            last_look=True,
        )
        return False

    @property
    def remembered_ids(self) -> int:
        """Matched pairs' ids kept for deduplication (see ``SEEN_IDS``)."""
        return len(self._seen)

    def _check_live(self, records: list[PairRecord], engine: RolloutEngine, now: float) -> bool:
        pinned = self.pinned
        if not pinned:
            return False
        missed = False
        for r in records:
            exp = pinned.get(r.inputs_digest or "")
            if exp is None:
                continue
            outcome = case_outcome(
                r.candidate.output, exp.expected, exp.score_tolerance, error=r.candidate.error
            )
            self.counters.pinned_checked += 1
            engine.pinned_result(
                case_name(exp.case_id),
                outcome.passed,
                now=now,
                detail=f"live request {r.id}: {outcome.detail}",
            )
            if not outcome.passed:
                self.counters.pinned_missed += 1
                missed = True
                log.warning(
                    "live request %s matches pinned case %d and the candidate misses it: %s",
                    r.id,
                    exp.case_id,
                    outcome.detail,
                )
        return missed

    def _harvest(
        self, records: list[PairRecord], rules: list[str | None], *, last_look: bool
    ) -> None:
        for record, rule in zip(records, rules, strict=True):
            if last_look:
                # No rule looks at this pair again: forget its id whatever happens.
                if self._seen.pop(record.id, 0) is None or rule is None:
                    continue  # (already harvested by a label-free rule) or no match
            else:
                if rule is None or record.id in self._seen:
                    continue
                self._seen[record.id] = None
                if len(self._seen) > SEEN_IDS:
                    self._seen.popitem(last=False)
            self.counters.matched += 1
            inputs = record.inputs
            if not inputs and self.recorder is not None:
                inputs = self.recorder.inputs_for(record.id)
            if not self._admit(rule):
                continue
            if self.recorder is not None:
                # The pair's row keeps its inputs too (capture: failures).
                self.recorder.mark_failure(record.id)
            case = HarvestedCase(
                task=self.task,
                rule=rule,
                record=record,
                inputs=inputs,
                rollout_id=self.rollout_id,
                champion=self.champion,
                candidate=self.candidate,
            )
            with self._cv:
                if len(self._queue) >= MAX_PENDING:
                    self.counters.dropped += 1
                    self._outcomes.labels("dropped_queue_full").inc()
                    continue
                self._queue.append(case)
                if len(self._queue) >= BATCH:
                    self._cv.notify_all()
            self._ensure_writer()

    def _admit(self, rule: str) -> bool:
        """The caps: per rule per window, then per rollout. Counted when refused."""
        s = self.settings
        now = self._clock()
        if now - self._window_start >= s.window_s:
            self._window_start, self._window_counts = now, {}
        if self._window_counts.get(rule, 0) >= s.max_cases_per_window:
            self.counters.skipped_window += 1
            self._outcomes.labels("skipped_window").inc()
            return False
        if self._per_rollout.get(self.rollout_id, 0) >= s.max_cases_per_rollout:
            self.counters.skipped_rollout_cap += 1
            self._outcomes.labels("skipped_rollout_cap").inc()
            return False
        self._window_counts[rule] = self._window_counts.get(rule, 0) + 1
        self._per_rollout[self.rollout_id] = self._per_rollout.get(self.rollout_id, 0) + 1
        return True

    # ------------------------------------------------------------------ writer thread

    def _ensure_writer(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(
                target=self._run, name="mirrorgate-harvest", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    if self._closing:
                        return
                    self._cv.wait(FLUSH_S)
                elif len(self._queue) < BATCH and not self._closing:
                    self._cv.wait(FLUSH_S)  # let a partial batch fill a little
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._writing = len(batch)
            try:
                if batch:
                    self._write(batch)
            finally:
                with self._cv:
                    self._writing = 0
                    self._cv.notify_all()

    def _write(self, batch: list[HarvestedCase]) -> None:
        try:
            results = self.store.harvest_many(batch)
        except Exception as exc:  # the database is down or refused: count, never raise
            self.counters.errors += len(batch)
            self._outcomes.labels("write_error").inc(len(batch))
            log.error("harvesting %d case(s) failed: %s", len(batch), exc)
            return
        for result in results:
            if result.created:
                self.counters.harvested += 1
                self._outcomes.labels("harvested").inc()
            else:
                self.counters.recurrences += 1
                self._outcomes.labels("recurrence").inc()

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout_s: float | None = None) -> bool:
        """Blocking: wait for the queued writes (tests, shutdown); True when done."""
        with self._cv:
            self._cv.notify_all()
            return self._cv.wait_for(lambda: not self._queue and not self._writing, timeout_s)

    def close(self) -> None:
        """Blocking: write what is queued, stop the writer thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
