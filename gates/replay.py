"""Replay recorded traffic through the identical runner, engine and gates, in time order.

Pairs are fed in timestamp order in chunks that end exactly where the evaluation cadence
(every K pairs or T seconds of record time) falls due, so the evaluations happen at the
same points as online. Labels with a timestamp are applied at that time (after the pairs
of the chunk they fall in); labels without one are attached to their pair when it
arrives. Replay stops at the first terminal decision (promote / abort): the evidence
printed is the evidence that decided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gates.engine import Decision, Evaluation, RolloutEngine
from gates.join import LabelEvent, LabelJoin
from gates.records import Label, PairRecord
from gates.runner import GateRunner
from gates.settings import GatesSettings, RolloutSettings, Task


@dataclass
class ReplayResult:
    evaluation: Evaluation
    decisions: list[Decision]
    pairs_read: int
    labels_read: int
    pairs_fed: int
    unmatched_labels: int
    unmatched_examples: list[tuple[LabelEvent, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        out = self.evaluation.to_dict()
        out["decisions"] = [
            {k: v for k, v in d.to_dict().items() if k != "evidence"} for d in self.decisions
        ]
        out["replay"] = {
            "pairs_read": self.pairs_read,
            "labels_read": self.labels_read,
            "pairs_fed": self.pairs_fed,
            "unmatched_labels": self.unmatched_labels,
            "unmatched_examples": [
                {"id": ev.id, "ts": ev.ts, "why": why} for ev, why in self.unmatched_examples[:20]
            ],
        }
        return out


def slice_keys(records: Iterable[PairRecord]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        if r.slices:
            keys.update(dict.fromkeys(r.slices))
    return sorted(keys)


def replay(
    records: Sequence[PairRecord],
    labels: Sequence[tuple[str, Label, float | None]] = (),
    *,
    gates: GatesSettings,
    plan: RolloutSettings,
    task: Task = "auto",
    reference: Sequence[PairRecord] | None = None,
    join: LabelJoin | None = None,
    stop_at_decision: bool = True,
) -> ReplayResult:
    if not records:
        raise ValueError("no paired records to replay")
    recs = sorted(records, key=lambda r: r.ts)  # stable: equal timestamps keep file order
    timed = sorted((x for x in labels if x[2] is not None), key=lambda x: float(x[2] or 0.0))
    untimed: dict[str, Label] = {rid: lab for rid, lab, ts in labels if ts is None}
    if untimed:
        # "immediately": a label without a time is known when its pair arrives
        recs = [
            dataclasses.replace(r, label=untimed.pop(r.id))
            if r.label is None and r.id in untimed
            else r
            for r in recs
        ]
    ts = np.fromiter((r.ts for r in recs), dtype=np.float64, count=len(recs))
    lab_ts = np.array([float(x[2] or 0.0) for x in timed], dtype=np.float64)
    events = [LabelEvent(rid, lab, t) for rid, lab, t in timed]
    start = float(min(ts[0], lab_ts[0])) if len(lab_ts) else float(ts[0])

    engine = RolloutEngine(gates, plan, task=task, start_ts=start)
    if reference is not None:
        engine.set_reference(reference, now=start, who="replay", why="reference file")
    runner = GateRunner(engine, join)
    every_k, every_t = plan.evaluate_every_pairs, plan.evaluate_every_s
    n, i, j = len(recs), 0, 0
    last: Evaluation | None = None

    def decided(ev: Evaluation | None) -> bool:
        return stop_at_decision and ev is not None and ev.verdict in ("promote", "abort")

    while i < n:
        since = engine.pairs - engine.pairs_at_last_eval
        by_count = i + max(every_k - since, 1) - 1
        by_time = int(np.searchsorted(ts, engine.last_eval_ts + every_t, side="left"))
        p = min(by_count, max(by_time, i), n - 1)
        now = float(ts[p])
        runner.add_pairs(recs[i : p + 1], now)
        k = int(np.searchsorted(lab_ts, now, side="right"))
        if k > j:
            runner.add_labels(events[j:k], now)
            j = k
        i = p + 1
        ev = runner.tick(now)
        if ev is not None:
            last = ev
            if decided(ev):
                break
    # labels after the last pair: still on the cadence's clock
    while j < len(events) and not decided(last):
        now = max(float(lab_ts[j]), engine.last_eval_ts + every_t)
        k = int(np.searchsorted(lab_ts, now, side="right"))
        runner.add_labels(events[j:k], now)
        j = k
        ev = runner.tick(now)
        last = ev or last
    if not decided(last):
        end = max(float(ts[-1]), float(lab_ts[-1]) if len(lab_ts) else float(ts[-1]))
        last = runner.tick(end, force=True)
        runner.flush()
    assert last is not None
    leftovers = [
        (LabelEvent(rid, lab, None), "no pair with this id") for rid, lab in untimed.items()
    ]
    examples = list(runner.unmatched) + leftovers
    return ReplayResult(
        evaluation=last,
        decisions=list(engine.decisions),
        pairs_read=len(records),
        labels_read=len(labels),
        pairs_fed=engine.pairs,
        unmatched_labels=runner.unmatched_total + len(leftovers),
        unmatched_examples=examples,
    )
