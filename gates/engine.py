"""The decision engine: a rollout plan of stages driven by the gates' evidence.

Rules (docs/gates.md):

* ABORT as soon as any blocking gate cell FAILs (at any stage, also while paused/held).
* ADVANCE when every required blocking cell PASSes (slice / class cells below their
  minimum sample size are exempt) and the stage's minimum pairs, labels and duration are
  met; PROMOTE instead when it is the last stage.
* A stage that reaches ``max_duration_s`` first ends as configured: ``hold`` (wait for a
  human: ``resume`` restarts the stage clock) or ``abort``.
* Manual ``promote`` / ``abort`` / ``pause`` / ``resume`` are recorded with who and why.
  ``pause`` stops advancing, never aborting.
* Gate evidence accumulates over the whole rollout (the e-processes are valid across
  stages); the stage minimums count from the start of the stage. Nothing re-baselines
  itself: the input-drift reference changes only through :meth:`RolloutEngine.set_reference`,
  which is recorded as a decision.

Everything the engine produces is plain data (:class:`Evaluation`, :class:`Decision`)
with ``to_dict()``; time is passed in (``now``), so replay and the proxy share one path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gates.base import Gate
from gates.batch import PairBatch, as_batch
from gates.contract import ContractGate
from gates.drift import InputDriftGate, OutputDriftGate
from gates.kinds import task_for
from gates.latency import ErrorGate, LatencyGate
from gates.metric import MetricGate
from gates.pinned import PinnedGate
from gates.records import PairRecord
from gates.result import AGGREGATE, GateResult, Status, fmt
from gates.settings import GatesSettings, RolloutSettings, StageSettings, Task
from gates.tolerance import ToleranceGate

Verdict = Literal["continue", "promote", "abort", "hold"]
ManualAction = Literal["promote", "abort", "pause", "resume"]
VERDICTS: tuple[Verdict, ...] = ("continue", "promote", "abort", "hold")
ENGINE_STATE_VERSION = 1


class InvalidTransition(ValueError):
    """A manual action that the rollout's current state does not allow (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """A state change of the rollout, with its evidence. The lead persists these."""

    ts: float
    action: str  # advance | promote | abort | hold | pause | resume | reference
    verdict: Verdict
    from_stage: str
    to_stage: str
    who: str  # "engine" for automatic decisions
    why: str
    pairs: int
    labels: int
    manual: bool = False
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "action": self.action,
            "verdict": self.verdict,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "who": self.who,
            "why": self.why,
            "pairs": self.pairs,
            "labels": self.labels,
            "manual": self.manual,
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(
            ts=float(d["ts"]),
            action=str(d["action"]),
            verdict=d["verdict"],
            from_stage=str(d["from_stage"]),
            to_stage=str(d["to_stage"]),
            who=str(d["who"]),
            why=str(d["why"]),
            pairs=int(d["pairs"]),
            labels=int(d["labels"]),
            manual=bool(d.get("manual", False)),
            evidence=list(d.get("evidence", [])),
        )


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One look at the evidence: verdict, stage, reason and every gate's result."""

    ts: float
    verdict: Verdict
    stage: str
    stage_index: int
    stages: tuple[str, ...]
    canary_weight: float
    reason: str
    pairs: int
    labels: int
    stage_pairs: int
    stage_labels: int
    stage_elapsed_s: float
    stage_minimums: dict[str, float | None]
    paused: bool
    gates: list[GateResult]
    decision: Decision | None
    decided_at: dict[str, int] | None
    alpha: float
    # The blocking cells that FAILed when the rollout was aborted: the evidence that
    # decided. E-processes are not monotone, so a later look may no longer show a cell
    # FAIL; the verdict's ``failing`` must still name what decided it.
    failing_at_decision: tuple[str, ...] | None = None

    @property
    def warnings(self) -> list[GateResult]:
        return [g for g in self.gates if g.warning]

    def to_dict(self) -> dict[str, Any]:
        """The object ``GET /v1/rollout`` and ``mirrorgate replay --json`` serve."""
        return {
            "verdict": self.verdict,
            "decided_at": self.decided_at,
            "reason": self.reason,
            "stage": self.stage,
            "stage_index": self.stage_index,
            "stages": list(self.stages),
            "canary_weight": self.canary_weight,
            "paused": self.paused,
            "ts": self.ts,
            "pairs": self.pairs,
            "labels": self.labels,
            "stage_progress": {
                "pairs": self.stage_pairs,
                "labels": self.stage_labels,
                "elapsed_s": self.stage_elapsed_s,
                **self.stage_minimums,
            },
            "alpha": self.alpha,
            "gates": [g.to_dict() for g in self.gates],
            "warnings": [g.reason for g in self.warnings],
            "decision": None if self.decision is None else self.decision.to_dict(),
            "failing_at_decision": (
                None if self.failing_at_decision is None else list(self.failing_at_decision)
            ),
        }

    def verdict_dict(self) -> dict[str, Any]:
        """Compact body for ``GET /v1/rollout/verdict`` (Argo web metric, Flagger webhook)."""
        failing = [g.label for g in self.gates if g.blocking and g.status is Status.FAIL]
        if self.failing_at_decision is not None:
            failing = list(self.failing_at_decision)
        return {
            "verdict": self.verdict,
            "stage": self.stage,
            "canary_weight": self.canary_weight,
            "reason": self.reason,
            "decided_at": self.decided_at,
            "pairs": self.pairs,
            "labels": self.labels,
            "failing": failing,
        }

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(metric name, labels, value) for the agreed Prometheus gauges."""
        out: list[tuple[str, dict[str, str], float]] = []
        for g in self.gates:
            labels = {"gate": g.name, "slice": g.slice}
            out.append(("mirrorgate_gate_status", labels, float(g.status.code)))
            if g.statistic is not None and math.isfinite(g.statistic):
                out.append(("mirrorgate_gate_statistic", labels, float(g.statistic)))
            if g.threshold is not None and math.isfinite(g.threshold):
                out.append(("mirrorgate_gate_threshold", labels, float(g.threshold)))
        for v in VERDICTS:
            out.append(("mirrorgate_rollout_verdict", {"verdict": v}, float(v == self.verdict)))
        for s in self.stages:
            out.append(("mirrorgate_rollout_stage", {"stage": s}, float(s == self.stage)))
        out.append(("mirrorgate_rollout_canary_weight", {}, self.canary_weight))
        return out


def _families(settings: GatesSettings) -> dict[str, Any]:
    return {
        "contract": settings.contract,
        "tolerance": settings.tolerance,
        "metric": settings.metric,
        "drift.output": settings.drift.output,
        "latency": settings.latency,
        "errors": settings.errors,
    }


def family_budgets(settings: GatesSettings) -> dict[str, float]:
    """Split the false-abort budget over the enabled *blocking* families by ``alpha_weight``.

    Fixed by the configuration alone, before any data: Bonferroni over the blocking
    families (and, inside each gate, over its blocking checks, slice cells and
    coordinates) plus Ville's inequality over time bound the probability of any false
    abort during the rollout by ``alpha``. A family that cannot abort (``blocking:
    false``, e.g. tolerance and output drift under the ``retrained`` preset) takes no
    share of that budget: its FAIL is evidence, tested at its own level
    (:func:`advisory_level`), which is stated in its results and is no part of the
    false-abort guarantee.
    """
    fams = _families(settings)
    blocking = {k: v for k, v in fams.items() if v.enabled and v.blocking}
    total = sum(v.alpha_weight for v in blocking.values())
    out = {}
    for k, v in fams.items():
        if k in blocking and total > 0:
            out[k] = settings.alpha * v.alpha_weight / total
        elif v.enabled:
            out[k] = advisory_level(settings, k)
        else:
            out[k] = 0.0
    return out


def advisory_level(settings: GatesSettings, family: str) -> float:
    """The level an advisory (non-blocking) family's evidence is tested at.

    Its share of ``alpha`` among all enabled families, as if every family blocked: the
    same level the family has when it does block in a configuration where all do. It is
    a per-family error rate of the evidence, spent outside the false-abort budget."""
    fams = _families(settings)
    total = sum(v.alpha_weight for v in fams.values() if v.enabled)
    v = fams[family]
    return settings.alpha * v.alpha_weight / total if v.enabled and total > 0 else 0.0


def blocking_budget(settings: GatesSettings) -> float:
    """The part of ``alpha`` spent by checks that can abort (equals ``alpha`` when any
    family blocks): the false-abort guarantee's level."""
    b = family_budgets(settings)
    return sum(b[k] for k, v in _families(settings).items() if v.enabled and v.blocking)


# Order is evaluation order: the output contract decides first (an incomparable candidate
# aborts on ``contract`` before any gate that needs comparable outputs could wait forever).
GATE_CLASSES: dict[str, type[Gate]] = {
    "contract": ContractGate,
    "tolerance": ToleranceGate,
    "metric": MetricGate,
    "drift.output": OutputDriftGate,
    "drift.input": InputDriftGate,
    "latency": LatencyGate,
    "errors": ErrorGate,
    "pinned": PinnedGate,
}


def _budget(settings: GatesSettings, family: str) -> float:
    if family == "drift.input":
        return settings.drift.input.alpha
    if family == "pinned":
        return 0.0
    return family_budgets(settings)[family]


class RolloutEngine:
    """Stage machine over the gates. Not thread-safe: call it from one task/thread."""

    def __init__(
        self,
        gates: GatesSettings,
        plan: RolloutSettings,
        *,
        task: Task = "auto",
        start_ts: float,
    ) -> None:
        self.settings = gates
        self.plan = plan
        self.task: Task = gates.task if task == "auto" else task
        self.task = task_for(gates.kind, gates.kinds, self.task)  # type: ignore[assignment]
        self.gates: dict[str, Gate] = {
            fam: cls(gates, alpha=_budget(gates, fam), task=self.task)
            for fam, cls in GATE_CLASSES.items()
        }
        self.start_ts = float(start_ts)
        self.stage_index = 0
        self.stage_started = float(start_ts)
        self.pairs = 0
        self.labels = 0
        self.stage_pairs = 0
        self.stage_labels = 0
        self.terminal: Verdict | None = None
        self.paused: tuple[str, str] | None = None
        self.held: str | None = None
        self.decisions: list[Decision] = []
        self.last_eval_ts = float(start_ts)
        self.pairs_at_last_eval = 0
        self.last: Evaluation | None = None

    # ------------------------------------------------------------------ properties

    @property
    def stage(self) -> StageSettings:
        return self.plan.stages[self.stage_index]

    @property
    def canary_weight(self) -> float:
        if self.terminal == "promote":
            return 1.0
        if self.terminal == "abort":
            return 0.0
        return self.stage.canary_weight

    @property
    def verdict(self) -> Verdict:
        if self.terminal is not None:
            return self.terminal
        if self.paused is not None or self.held is not None:
            return "hold"
        return "continue"

    # ------------------------------------------------------------------ evidence in

    def observe(self, records: PairBatch | Sequence[PairRecord]) -> None:
        """Every mirrored pair (labelled or not) feeds the label-free gates."""
        batch = as_batch(records)
        if batch.n == 0:
            return
        for g in self.gates.values():
            if not g.needs_labels:
                g.update(batch)
        self.pairs += batch.n
        self.stage_pairs += batch.n

    def observe_labelled(self, records: PairBatch | Sequence[PairRecord]) -> None:
        """Pairs whose ``label`` is set (joined) feed the metric gates."""
        batch = as_batch(records)
        if batch.n == 0:
            return
        for g in self.gates.values():
            if g.needs_labels:
                g.update(batch)
        self.labels += batch.n
        self.stage_labels += batch.n

    def pinned_result(self, case_id: str, correct: bool, *, now: float, detail: str = "") -> None:
        """The candidate's outcome on one pinned failure case."""
        pinned = self.gates["pinned"]
        assert isinstance(pinned, PinnedGate)
        pinned.record(case_id, correct, ts=now, detail=detail)

    def set_reference(
        self, records: Sequence[PairRecord], *, now: float, who: str, why: str
    ) -> Decision:
        """Fix the input-drift reference (a deliberate, recorded act)."""
        gate = self.gates["drift.input"]
        assert isinstance(gate, InputDriftGate)
        gate.set_reference(records)
        return self._record(
            now,
            "reference",
            self.verdict,
            who=who,
            why=f"{why} ({len(records)} records)",
            manual=who != "engine",
        )

    # ------------------------------------------------------------------ evaluation

    def due(self, now: float) -> bool:
        """Cadence: K new pairs or T seconds since the last evaluation, whichever first."""
        return (
            self.pairs - self.pairs_at_last_eval >= self.plan.evaluate_every_pairs
            or now - self.last_eval_ts >= self.plan.evaluate_every_s
        )

    def results(self) -> list[GateResult]:
        out: list[GateResult] = []
        for g in self.gates.values():
            out.extend(g.results)
        return out

    def evaluate(self, now: float) -> Evaluation:
        results = self.results()
        self.last_eval_ts = float(now)
        self.pairs_at_last_eval = self.pairs
        decision: Decision | None = None
        stage = self.stage
        fails = [r for r in results if r.blocking and r.status is Status.FAIL]
        if self.terminal is not None:
            reason = self._terminal_reason()
        elif fails:
            reason = self._fail_reason(fails)
            decision = self._record(now, "abort", "abort", why=reason, results=results)
        elif self.paused is not None:
            who, why = self.paused
            reason = f"hold: paused by {who}: {why}; {self._waiting(results, now)}"
        elif self.held is not None:
            reason = self.held
        else:
            pending = self._pending(results)
            minimums = self._minimums_missing(now)
            elapsed = now - self.stage_started
            if not pending and not minimums:
                last = self.stage_index == len(self.plan.stages) - 1
                reason = self._pass_reason(results, stage, last)
                if last:
                    decision = self._record(now, "promote", "promote", why=reason, results=results)
                else:
                    decision = self._record(
                        now,
                        "advance",
                        "continue",
                        why=reason,
                        results=results,
                        to_stage=self.plan.stages[self.stage_index + 1].name,
                    )
            elif stage.max_duration_s is not None and elapsed >= stage.max_duration_s:
                reason = (
                    f"{stage.on_max_duration}: stage {stage.name} reached its maximum "
                    f"duration {fmt(stage.max_duration_s)} s without a decision; "
                    + self._waiting(results, now)
                )
                action = stage.on_max_duration
                decision = self._record(now, action, action, why=reason, results=results)
            else:
                reason = f"continue: stage {stage.name}: {self._waiting(results, now)}"
        evaluation = self._evaluation(now, results, reason, decision)
        self.last = evaluation
        return evaluation

    def manual(self, action: ManualAction, who: str, why: str, now: float) -> Decision:
        """A human's override, recorded with who and why."""
        if not who.strip():
            raise InvalidTransition("a manual action needs 'who'")
        if self.terminal is not None:
            raise InvalidTransition(f"the rollout already ended: {self.terminal}")
        if action == "promote":
            return self._record(now, "promote", "promote", who=who, why=why, manual=True)
        if action == "abort":
            return self._record(now, "abort", "abort", who=who, why=why, manual=True)
        if action == "pause":
            if self.paused is not None:
                raise InvalidTransition("the rollout is already paused")
            return self._record(now, "pause", "hold", who=who, why=why, manual=True)
        if action == "resume":
            if self.paused is None and self.held is None:
                raise InvalidTransition("the rollout is neither paused nor held")
            return self._record(now, "resume", "continue", who=who, why=why, manual=True)
        raise InvalidTransition(f"unknown action {action!r}")

    # ------------------------------------------------------------------ internals

    def _record(
        self,
        now: float,
        action: str,
        verdict: Verdict,
        *,
        why: str,
        who: str = "engine",
        manual: bool = False,
        results: list[GateResult] | None = None,
        to_stage: str | None = None,
    ) -> Decision:
        evidence = [
            r.to_dict()
            for r in (results if results is not None else self.results())
            if r.blocking or r.warning
        ]
        decision = Decision(
            ts=float(now),
            action=action,
            verdict=verdict,
            from_stage=self.stage.name,
            to_stage=to_stage or self.stage.name,
            who=who,
            why=why,
            pairs=self.pairs,
            labels=self.labels,
            manual=manual,
            evidence=evidence,
        )
        self._apply(decision)
        self.decisions.append(decision)
        return decision

    def _apply(self, d: Decision) -> None:
        if d.action in ("promote", "abort"):
            self.terminal = "promote" if d.action == "promote" else "abort"
        elif d.action == "advance":
            self.stage_index += 1
            self._new_stage(d.ts)
        elif d.action == "hold":
            self.held = d.why
        elif d.action == "pause":
            self.paused = (d.who, d.why)
        elif d.action == "resume":
            if self.held is not None:
                self.stage_started = d.ts  # a held stage gets a fresh max-duration clock
            self.paused = None
            self.held = None

    def _new_stage(self, now: float) -> None:
        self.stage_started = float(now)
        self.stage_pairs = 0
        self.stage_labels = 0

    def _terminal_decision(self) -> Decision | None:
        for d in reversed(self.decisions):
            if d.action in ("promote", "abort"):
                return d
        return None

    def _decided_at(self) -> dict[str, int] | None:
        d = self._terminal_decision()
        if d is None and self.held is not None:
            d = next((x for x in reversed(self.decisions) if x.action == "hold"), None)
        return None if d is None else {"pairs": d.pairs, "labels": d.labels}

    def _failing_at_decision(self) -> tuple[str, ...] | None:
        d = self._terminal_decision()
        if d is None or d.action != "abort":
            return None
        return tuple(
            e["name"] if e["slice"] == AGGREGATE else f"{e['name']}[{e['slice']}]"
            for e in d.evidence
            if e.get("blocking") and e.get("status") == Status.FAIL.value
        )

    def _terminal_reason(self) -> str:
        d = self._terminal_decision()
        if d is None:
            return str(self.terminal)
        if d.manual:
            return f"{d.action} by {d.who}: {d.why}"
        return d.why

    def _required(self, r: GateResult, stage: StageSettings) -> bool:
        if not r.blocking or r.exempt:
            return False
        if r.slice != AGGREGATE and not self.settings.slices.require_pass:
            return False
        if stage.require is None:
            return True
        return any(r.name == p or r.name.startswith(p + ".") for p in stage.require)

    def _pending(self, results: list[GateResult]) -> list[GateResult]:
        stage = self.stage
        return [r for r in results if self._required(r, stage) and r.status is not Status.PASS]

    def _minimums_missing(self, now: float) -> list[str]:
        s = self.stage
        out = []
        if self.stage_pairs < s.min_pairs:
            out.append(f"pairs {self.stage_pairs}/{s.min_pairs}")
        if self.stage_labels < s.min_labels:
            out.append(f"labels {self.stage_labels}/{s.min_labels}")
        elapsed = now - self.stage_started
        if elapsed < s.min_duration_s:
            out.append(f"duration {fmt(elapsed)}/{fmt(s.min_duration_s)} s")
        return out

    def _waiting(self, results: list[GateResult], now: float) -> str:
        pending = self._pending(results)
        parts = []
        if pending:
            first = pending[0]
            more = f" (+{len(pending) - 1} more)" if len(pending) > 1 else ""
            parts.append(f"waiting for {first.label}: {first.reason}{more}")
        minimums = self._minimums_missing(now)
        if minimums:
            parts.append("stage minimums not met: " + ", ".join(minimums))
        if not parts:
            parts.append("all required gates PASS and minimums met")
        return "; ".join(parts)

    def _fail_reason(self, fails: list[GateResult]) -> str:
        first = fails[0]
        others = ", ".join(r.label for r in fails[1:4])
        more = f" (also failing: {others}{' ...' if len(fails) > 4 else ''})" if others else ""
        return (
            f"abort at stage {self.stage.name} after {self.pairs} pairs / {self.labels} labels: "
            f"{first.label} FAIL (statistic {fmt(first.statistic)}, threshold "
            f"{fmt(first.threshold)}, n={first.n}, {first.method.name}): {first.reason}{more}"
        )

    def _pass_reason(self, results: list[GateResult], stage: StageSettings, last: bool) -> str:
        required = [r for r in results if self._required(r, stage)]
        tight = min(
            required,
            key=lambda r: float(r.details.get("log_e_pass", math.inf)),
            default=None,
        )
        what = "promote" if last else f"advance to {self.plan.stages[self.stage_index + 1].name}"
        head = (
            f"{what}: all {len(required)} required blocking gate cells PASS in stage "
            f"{stage.name} after {self.pairs} pairs / {self.labels} labels"
        )
        if tight is None:
            return head
        return f"{head}; closest to its limit: {tight.label}: {tight.reason}"

    def _evaluation(
        self, now: float, results: list[GateResult], reason: str, decision: Decision | None
    ) -> Evaluation:
        s = self.stage
        return Evaluation(
            ts=float(now),
            verdict=self.verdict,
            stage=s.name,
            stage_index=self.stage_index,
            stages=tuple(x.name for x in self.plan.stages),
            canary_weight=self.canary_weight,
            reason=reason,
            pairs=self.pairs,
            labels=self.labels,
            stage_pairs=self.stage_pairs,
            stage_labels=self.stage_labels,
            stage_elapsed_s=float(now) - self.stage_started,
            stage_minimums={
                "min_pairs": s.min_pairs,
                "min_labels": s.min_labels,
                "min_duration_s": s.min_duration_s,
                "max_duration_s": s.max_duration_s,  # None: no limit (JSON-safe)
            },
            paused=self.paused is not None,
            gates=results,
            decision=decision,
            decided_at=self._decided_at(),
            alpha=self.settings.alpha,
            failing_at_decision=self._failing_at_decision(),
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": ENGINE_STATE_VERSION,
            "task": self.task,
            "start_ts": self.start_ts,
            "stage_index": self.stage_index,
            "stage_started": self.stage_started,
            "pairs": self.pairs,
            "labels": self.labels,
            "stage_pairs": self.stage_pairs,
            "stage_labels": self.stage_labels,
            "terminal": self.terminal,
            "paused": None if self.paused is None else list(self.paused),
            "held": self.held,
            "last_eval_ts": self.last_eval_ts,
            "pairs_at_last_eval": self.pairs_at_last_eval,
            "decisions": [d.to_dict() for d in self.decisions],
            "gates": {k: g.state_dict() for k, g in self.gates.items()},
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], gates: GatesSettings, plan: RolloutSettings
    ) -> RolloutEngine:
        if state.get("version") != ENGINE_STATE_VERSION:
            raise ValueError(f"unsupported engine state version {state.get('version')!r}")
        eng = cls(gates, plan, task=state.get("task", "auto"), start_ts=state["start_ts"])
        if not 0 <= int(state["stage_index"]) < len(plan.stages):
            raise ValueError("engine state: stage index outside the plan")
        eng.stage_index = int(state["stage_index"])
        eng.stage_started = float(state["stage_started"])
        eng.pairs, eng.labels = int(state["pairs"]), int(state["labels"])
        eng.stage_pairs, eng.stage_labels = int(state["stage_pairs"]), int(state["stage_labels"])
        eng.terminal = state.get("terminal")
        paused = state.get("paused")
        eng.paused = None if paused is None else (str(paused[0]), str(paused[1]))
        eng.held = state.get("held")
        eng.last_eval_ts = float(state["last_eval_ts"])
        eng.pairs_at_last_eval = int(state["pairs_at_last_eval"])
        eng.decisions = [Decision.from_dict(d) for d in state.get("decisions", [])]
        for fam, gstate in state.get("gates", {}).items():
            klass = GATE_CLASSES.get(fam)
            if klass is None:
                raise ValueError(f"engine state: unknown gate family {fam!r}")
            eng.gates[fam] = klass.from_state(gstate, gates, alpha=_budget(gates, fam))
        return eng

    def merge(self, other: RolloutEngine) -> None:
        """Add another replica's evidence (gate states and pair/label counts).

        The stage machine (decisions, pause, hold) stays this engine's: one place decides.
        Both must be in the same stage.
        """
        if other.stage_index != self.stage_index:
            raise ValueError("cannot merge engines in different stages")
        for fam, g in self.gates.items():
            g.merge(other.gates[fam])
        self.pairs += other.pairs
        self.labels += other.labels
        self.stage_pairs += other.stage_pairs
        self.stage_labels += other.stage_labels
