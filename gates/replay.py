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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from gates.columns import PairColumns
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
    # False: the stream stopped at the decision, pairs_read counts the pairs read until
    # then (replay_stream without read_all)
    read_to_end: bool = True

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
            "read_to_end": self.read_to_end,
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


# ---------------------------------------------------------------- streaming replay

Block = PairColumns | list[PairRecord]


class NoPairs(ValueError):
    """The stream held no paired record."""


class OutOfOrder(Exception):
    """The pairs go back in time: a stream cannot sort them; read the file whole instead."""


class _Stream:
    """Blocks of rows read on demand; rows are addressed by their index in the file."""

    def __init__(self, blocks: Iterable[Block], untimed: dict[str, Label]) -> None:
        self._blocks: Iterator[Block] = iter(blocks)
        self._untimed = untimed
        self._segs: list[Block] = []
        self._offset = 0  # rows of _segs[0] already handed out
        self.base = 0  # file index of the first buffered row
        self.ts = np.empty(0, dtype=np.float64)  # timestamps of the buffered rows
        self.read = 0
        self.done = False
        self.last_ts = -np.inf

    @property
    def end(self) -> int:
        return self.base + len(self.ts)

    def fill(self, upto: int) -> None:
        """Read until row ``upto`` is buffered or the file ends."""
        while not self.done and self.end <= upto:
            self._pull()

    def drain(self) -> None:
        """Read the rest (counted, validated, its untimed labels matched), feeding nothing."""
        while not self.done:
            self._pull()
            self._segs, self._offset = [], 0
            self.base, self.ts = self.end, self.ts[:0]

    def _pull(self) -> None:
        block = next(self._blocks, None)
        if block is None:
            self.done = True
            return
        if isinstance(block, PairColumns):
            ts = block.ts
            if self._untimed:
                # "immediately": a label without a time is known when its pair arrives
                labels, untimed = block.labels, self._untimed
                for i, rid in enumerate(block.ids):
                    if labels[i] is None and rid in untimed:
                        labels[i] = untimed.pop(rid)
        else:
            ts = np.fromiter((r.ts for r in block), dtype=np.float64, count=len(block))
            if self._untimed:
                block = [
                    dataclasses.replace(r, label=self._untimed.pop(r.id))
                    if r.label is None and r.id in self._untimed
                    else r
                    for r in block
                ]
        if not len(ts):
            return
        if ts[0] < self.last_ts or (len(ts) > 1 and bool((np.diff(ts) < 0).any())):
            raise OutOfOrder(f"pair {self.read + 1} or after goes back in time")
        self.last_ts = float(ts[-1])
        self._segs.append(block)
        self.ts = np.concatenate([self.ts, ts]) if len(self.ts) else np.asarray(ts)
        self.read += len(ts)

    def take(self, stop: int) -> list[Block]:
        """Rows ``base .. stop - 1``, in order, as the blocks' own pieces."""
        parts: list[Block] = []
        need = stop - self.base
        while need > 0:
            seg = self._segs[0]
            size = seg.n if isinstance(seg, PairColumns) else len(seg)
            k = min(size - self._offset, need)
            a, b = self._offset, self._offset + k
            if a == 0 and b == size:
                parts.append(seg)
            else:
                parts.append(seg.rows(a, b) if isinstance(seg, PairColumns) else seg[a:b])
            self._offset, need = b, need - k
            if b == size:
                self._segs.pop(0)
                self._offset = 0
        self.ts = self.ts[stop - self.base :]
        self.base = stop
        return parts


def _feed(runner: GateRunner, parts: list[Block], now: float, labels_may_come: bool) -> None:
    cols = [p for p in parts if isinstance(p, PairColumns)]
    if len(cols) == len(parts) and all(c.signature() == cols[0].signature() for c in cols):
        runner.add_columns(PairColumns.concat(cols), now, labels_may_come=labels_may_come)
        return
    # a look with rows of both forms (or of two output shapes): records, as the
    # general path builds them, so that from_records masks and judges them the same
    records: list[PairRecord] = []
    for p in parts:
        records.extend(p.records() if isinstance(p, PairColumns) else p)
    runner.add_pairs(records, now)


def replay_stream(
    blocks: Iterable[Block],
    labels: Sequence[tuple[str, Label, float | None]] = (),
    *,
    gates: GatesSettings,
    plan: RolloutSettings,
    task: Task = "auto",
    reference: Sequence[PairRecord] | None = None,
    join: LabelJoin | None = None,
    read_all: bool = False,
) -> ReplayResult:
    """:func:`replay` over pairs read while replaying, in file order, which must be time
    order (:class:`OutOfOrder` otherwise, raised before any result: read the file whole
    and call :func:`replay`). Same looks at the same pairs, same decisions; reading stops
    at the decision unless ``read_all`` (then the rest is read, counted and checked, and
    the result is :func:`replay`'s to the last field).
    """
    timed = sorted((x for x in labels if x[2] is not None), key=lambda x: float(x[2] or 0.0))
    untimed: dict[str, Label] = {rid: lab for rid, lab, ts in labels if ts is None}
    lab_ts = np.array([float(x[2] or 0.0) for x in timed], dtype=np.float64)
    events = [LabelEvent(rid, lab, t) for rid, lab, t in timed]
    stream = _Stream(blocks, untimed)
    stream.fill(0)
    if stream.end == 0:
        raise NoPairs("no paired records to replay")
    first = float(stream.ts[0])
    start = float(min(first, lab_ts[0])) if len(lab_ts) else first

    engine = RolloutEngine(gates, plan, task=task, start_ts=start)
    if reference is not None:
        engine.set_reference(reference, now=start, who="replay", why="reference file")
    runner = GateRunner(engine, join)
    every_k, every_t = plan.evaluate_every_pairs, plan.evaluate_every_s
    i, j = 0, 0
    last: Evaluation | None = None

    def decided(ev: Evaluation | None) -> bool:
        return ev is not None and ev.verdict in ("promote", "abort")

    while True:
        stream.fill(i)
        if stream.end <= i:
            break
        since = engine.pairs - engine.pairs_at_last_eval
        by_count = i + max(every_k - since, 1) - 1
        stream.fill(by_count)  # the look's rows: never more than the cadence's count ahead
        base = stream.base
        by_time = base + int(np.searchsorted(stream.ts, engine.last_eval_ts + every_t, side="left"))
        p = min(by_count, max(by_time, i), stream.end - 1)
        now = float(stream.ts[p - base])
        _feed(runner, stream.take(p + 1), now, labels_may_come=j < len(events))
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
    stopped = decided(last)
    if read_all or not stopped:
        stream.drain()
    while j < len(events) and not decided(last):
        now = max(float(lab_ts[j]), engine.last_eval_ts + every_t)
        k = int(np.searchsorted(lab_ts, now, side="right"))
        runner.add_labels(events[j:k], now)
        j = k
        ev = runner.tick(now)
        last = ev or last
    if not decided(last):
        end = max(stream.last_ts, float(lab_ts[-1]) if len(lab_ts) else stream.last_ts)
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
        pairs_read=stream.read,
        labels_read=len(labels),
        pairs_fed=engine.pairs,
        unmatched_labels=runner.unmatched_total + len(leftovers),
        unmatched_examples=examples,
        read_to_end=stream.done,
    )
