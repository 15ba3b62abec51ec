"""Bounded label join, used by both ``mirrorgate replay`` and the online proxy.

Labels arrive later than pairs (or, occasionally, before them). Pairs wait for their label
in a window bounded by count and time; labels wait for their pair until ``label_window_s``
and are then *reported* as unmatched by :meth:`LabelJoin.expire` (also when pushed out by
the count bound, or superseded by a newer label for the same id): never silently lost.
``now`` is whatever clock the caller runs on (wall time online, record time in replay).

A label whose pair will never come (the candidate is stopped, the request was not mirrored)
must not wait here: the caller says so with ``add_labels(..., never_paired=...)`` and such a
label only completes a pair already waiting; otherwise it is counted in
``JoinStats.labels_not_gated`` and not kept (the database stores every label regardless).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gates.records import Label, PairRecord


@dataclass(frozen=True, slots=True)
class LabelEvent:
    id: str
    label: Label
    ts: float | None = None


@dataclass(slots=True)
class Expired:
    """What :meth:`LabelJoin.expire` hands back: unmatched labels and why."""

    labels: list[tuple[LabelEvent, str]] = field(default_factory=list)  # (label, reason)
    pairs: int = 0  # pairs that left the window unlabelled (normal: most never get one)


@dataclass(slots=True)
class JoinStats:
    matched: int = 0
    labels_unmatched: int = 0
    pairs_expired: int = 0
    pairs_evicted: int = 0
    labels_not_gated: int = 0  # unmatched labels not kept: their pair will never be gated


class LabelJoin:
    def __init__(
        self,
        *,
        max_pending_pairs: int = 100_000,
        pair_window_s: float = 86_400.0,
        max_pending_labels: int = 100_000,
        label_window_s: float = 86_400.0,
    ) -> None:
        if min(max_pending_pairs, max_pending_labels) < 1:
            raise ValueError("join bounds must be positive")
        if min(pair_window_s, label_window_s) <= 0:
            raise ValueError("join bounds must be positive")
        self.max_pending_pairs = max_pending_pairs
        self.pair_window_s = pair_window_s
        self.max_pending_labels = max_pending_labels
        self.label_window_s = label_window_s
        self._pairs: OrderedDict[str, tuple[float, PairRecord]] = OrderedDict()
        self._labels: OrderedDict[str, tuple[float, LabelEvent]] = OrderedDict()
        self._dropped: list[tuple[LabelEvent, str]] = []
        self._evicted_pairs = 0
        self.stats = JoinStats()

    @property
    def pending_pairs(self) -> int:
        return len(self._pairs)

    @property
    def pending_labels(self) -> int:
        return len(self._labels)

    def waiting_pair_ids(self, arrived_before: float, limit: int) -> list[str]:
        """Ids of pairs still waiting for a label that arrived before the given time
        (oldest first): what a replica looks up among labels other replicas received."""
        out: list[str] = []
        for rid, (arrived, _) in self._pairs.items():
            if arrived >= arrived_before or len(out) >= limit:
                break
            out.append(rid)
        return out

    def add_pairs(self, records: Sequence[PairRecord], now: float) -> list[PairRecord]:
        """Returns the records that are labelled now: those that came with a label and
        those whose label was already waiting. The others wait for theirs."""
        out: list[PairRecord] = []
        for rec in records:
            if rec.label is not None:
                out.append(rec)
                continue
            waiting = self._labels.pop(rec.id, None)
            if waiting is not None:
                out.append(dataclasses.replace(rec, label=waiting[1].label))
                continue
            self._pairs.pop(rec.id, None)
            self._pairs[rec.id] = (now, rec)
            if len(self._pairs) > self.max_pending_pairs:
                self._pairs.popitem(last=False)
                self._evicted_pairs += 1
                self.stats.pairs_evicted += 1
        self.stats.matched += len(out)
        return out

    def add_labels(
        self,
        labels: Iterable[LabelEvent],
        now: float,
        *,
        never_paired: Callable[[str], bool] | None = None,
    ) -> list[PairRecord]:
        """Returns the waiting pairs these labels complete; other labels wait for a pair,
        except those ``never_paired`` says will never get one (counted, not kept)."""
        out: list[PairRecord] = []
        for ev in labels:
            pending = self._pairs.pop(ev.id, None)
            if pending is not None:
                out.append(dataclasses.replace(pending[1], label=ev.label))
                continue
            if never_paired is not None and never_paired(ev.id):
                # Waiting would only hold memory for up to label_window_s (the soak's
                # growth after an abort): no pair with this id reaches the gates.
                self.stats.labels_not_gated += 1
                continue
            old = self._labels.pop(ev.id, None)
            if old is not None:
                self._dropped.append((old[1], "superseded by a newer label"))
            self._labels[ev.id] = (now, ev)
            if len(self._labels) > self.max_pending_labels:
                _, (_, first) = self._labels.popitem(last=False)
                self._dropped.append((first, "pending-label bound reached"))
        self.stats.matched += len(out)
        return out

    def expire(self, now: float) -> Expired:
        """Drop pairs older than the pair window and report labels that found no pair."""
        result = Expired(labels=self._dropped, pairs=self._evicted_pairs)
        self._dropped, self._evicted_pairs = [], 0
        cutoff = now - self.pair_window_s
        while self._pairs:
            _, (arrived, _) = next(iter(self._pairs.items()))
            if arrived > cutoff:
                break
            self._pairs.popitem(last=False)
            result.pairs += 1
            self.stats.pairs_expired += 1
        cutoff = now - self.label_window_s
        while self._labels:
            _, (arrived, ev) = next(iter(self._labels.items()))
            if arrived > cutoff:
                break
            self._labels.popitem(last=False)
            result.labels.append((ev, f"no pair within label_window_s={self.label_window_s:g}"))
        self.stats.labels_unmatched += len(result.labels)
        return result

    def flush(self) -> Expired:
        """End of stream (replay): everything still waiting is reported."""
        result = self.expire(float("inf"))
        return result
