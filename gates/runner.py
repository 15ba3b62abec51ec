"""One path for the online proxy and ``mirrorgate replay``: pairs and labels in, evaluations out.

The proxy calls :meth:`GateRunner.add_pairs` with each recorded batch, :meth:`add_labels`
with ``POST /v1/feedback`` bodies and :meth:`tick` on a timer (wall clock); replay calls the
same methods with record timestamps as the clock. Nothing here blocks or does I/O: the
caller runs it off the live path (a background task) and persists what it returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from gates.batch import PairBatch
from gates.columns import PairColumns
from gates.engine import Evaluation, RolloutEngine
from gates.join import LabelEvent, LabelJoin
from gates.records import PairRecord

UnmatchedHandler = Callable[[list[tuple[LabelEvent, str]]], None]
LabelledHandler = Callable[[list[PairRecord]], None]


class GateRunner:
    def __init__(
        self,
        engine: RolloutEngine,
        join: LabelJoin | None = None,
        *,
        on_unmatched: UnmatchedHandler | None = None,
        keep_unmatched: int = 1000,
        on_labelled: LabelledHandler | None = None,
    ) -> None:
        self.engine = engine
        self.join = join or LabelJoin()
        self.on_unmatched = on_unmatched
        # Called with each batch of newly labelled pairs after the gates saw it (the
        # proxy's harvest step uses it; replay leaves it unset).
        self.on_labelled = on_labelled
        # Says which request ids will never bring a pair (the proxy: candidate stopped,
        # request not mirrored): their labels are not kept waiting in the join.
        self.never_paired: Callable[[str], bool] | None = None
        # the most recent unmatched labels, for reports; the total is always counted
        self.unmatched: deque[tuple[LabelEvent, str]] = deque(maxlen=keep_unmatched)
        self.unmatched_total = 0
        self.pairs_expired = 0

    def add_pairs(
        self, records: Sequence[PairRecord], now: float, *, batch: PairBatch | None = None
    ) -> None:
        """``batch``, when given, is these records' batch already built (replay's columns)."""
        if not records:
            return
        self.expire(now)  # windows first: what left them before `now` cannot match
        if batch is None:
            batch = PairBatch.from_records(records)  # built once, read by every gate
        self.engine.observe(batch)
        if self.join.pending_labels == 0 and all(r.label is not None for r in records):
            # all came labelled and no label waits for them: what join.add_pairs would do
            self.join.stats.matched += len(records)
            self.engine.observe_labelled(batch)
            labelled = list(records)
        else:
            labelled = self.join.add_pairs(records, now)
            if not labelled:
                return
            # records that came labelled are the same objects: reuse their batch rows
            position = {id(r): i for i, r in enumerate(records)}
            rows = [position.get(id(r), -1) for r in labelled]
            if all(i >= 0 for i in rows):
                self.engine.observe_labelled(batch.select(np.array(rows, dtype=np.int64)))
            else:
                self.engine.observe_labelled(labelled)
        # Every labelled pair reaches the hook, whichever side of the join came last.
        if self.on_labelled is not None:
            self.on_labelled(labelled)

    def add_columns(self, cols: PairColumns, now: float, *, labels_may_come: bool) -> None:
        """:meth:`add_pairs` for rows in column form (replay's fast path).

        While a label may still arrive for these pairs (``labels_may_come``, or labels
        waiting in the join) the rows become records and take the join like any others.
        Otherwise an unlabelled pair can never be completed, so only the labelled rows
        matter: they go to the metric gates as the join would hand them over (in order),
        without a record being built. Replay passes False once its label file is spent.
        """
        if cols.n == 0:
            return
        batch = PairBatch.from_columns(cols)
        if labels_may_come or self.join.pending_labels or self.on_labelled is not None:
            self.add_pairs(cols.records(), now, batch=batch)
            return
        self.expire(now)
        self.engine.observe(batch)
        rows = [i for i, lab in enumerate(cols.labels) if lab is not None]
        self.join.stats.matched += len(rows)
        if len(rows) == cols.n:
            self.engine.observe_labelled(batch)
        elif rows:
            self.engine.observe_labelled(batch.select(np.array(rows, dtype=np.int64)))

    def add_labels(self, labels: Iterable[LabelEvent], now: float) -> int:
        """Returns how many pairs these labels completed (the others wait)."""
        return len(self.join_labels(labels, now))

    def join_labels(self, labels: Iterable[LabelEvent], now: float) -> list[PairRecord]:
        """Like :meth:`add_labels`, returning the pairs the labels completed."""
        self.expire(now)
        matched = self.join.add_labels(labels, now, never_paired=self.never_paired)
        if matched:
            self.engine.observe_labelled(matched)
            if self.on_labelled is not None:
                self.on_labelled(matched)
        return matched

    def expire(self, now: float) -> None:
        self._report(self.join.expire(now).labels, self.join.stats.pairs_expired)

    def flush(self) -> None:
        """End of a finite stream: every waiting label is reported unmatched."""
        self._report(self.join.flush().labels, self.join.stats.pairs_expired)

    def _report(self, labels: list[tuple[LabelEvent, str]], expired: int) -> None:
        self.pairs_expired = expired
        if not labels:
            return
        self.unmatched.extend(labels)
        self.unmatched_total += len(labels)
        if self.on_unmatched is not None:
            self.on_unmatched(labels)

    def tick(self, now: float, *, force: bool = False) -> Evaluation | None:
        """Expire the join's windows; evaluate when the cadence says so (or ``force``)."""
        self.expire(now)
        if force or self.engine.due(now):
            return self.engine.evaluate(now)
        return None
