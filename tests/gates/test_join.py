"""The bounded label join: bounded by count and time, nothing lost silently."""

from __future__ import annotations

import pytest

from gates.join import LabelEvent, LabelJoin
from tests.gates.conftest import record


def rec(i: int, label=None):
    return record(i, [0.2, 0.8], [0.3, 0.7], label=label)


def test_pairs_wait_for_labels_and_labels_for_pairs():
    join = LabelJoin()
    assert [r.id for r in join.add_pairs([rec(1), rec(2), rec(3, label=0)], now=0.0)] == ["r3"]
    matched = join.add_labels([LabelEvent("r1", 1), LabelEvent("r9", 0)], now=1.0)
    assert [(r.id, r.label) for r in matched] == [("r1", 1)]
    assert join.pending_pairs == 1 and join.pending_labels == 1
    # the label that came first completes its pair when the pair arrives
    assert [(r.id, r.label) for r in join.add_pairs([rec(9)], now=2.0)] == [("r9", 0)]
    assert join.pending_labels == 0 and join.stats.matched == 3


def test_unmatched_labels_are_reported_after_the_window_never_dropped():
    join = LabelJoin(label_window_s=10.0)
    join.add_labels([LabelEvent("a", 1, 0.0)], now=0.0)
    join.add_labels([LabelEvent("b", 0, 5.0)], now=5.0)
    assert join.expire(9.0).labels == []
    out = join.expire(10.0)
    assert [ev.id for ev, _ in out.labels] == ["a"] and "label_window_s" in out.labels[0][1]
    assert [ev.id for ev, _ in join.flush().labels] == ["b"]
    assert join.stats.labels_unmatched == 2


def test_count_bounds_evict_oldest_and_report_them():
    join = LabelJoin(max_pending_pairs=2, max_pending_labels=2)
    join.add_pairs([rec(1), rec(2), rec(3)], now=0.0)
    assert join.pending_pairs == 2
    join.add_labels([LabelEvent("x", 1), LabelEvent("y", 1), LabelEvent("z", 1)], now=0.0)
    out = join.expire(0.0)
    assert out.pairs == 1  # r1 pushed out, counted
    assert [(ev.id, why) for ev, why in out.labels] == [("x", "pending-label bound reached")]
    # r1 is gone: its label now waits (and would be reported), it does not match
    assert join.add_labels([LabelEvent("r1", 0)], now=1.0) == []


def test_pairs_leave_the_window_and_a_newer_label_supersedes():
    join = LabelJoin(pair_window_s=5.0)
    join.add_pairs([rec(1)], now=0.0)
    assert join.expire(5.0).pairs == 1 and join.pending_pairs == 0
    join.add_labels([LabelEvent("q", 0)], now=6.0)
    join.add_labels([LabelEvent("q", 1)], now=7.0)
    ((old, why),) = join.expire(7.0).labels
    assert old.label == 0 and "superseded" in why
    assert [
        r.label
        for r in join.add_pairs(
            [
                record(0, [1.0], [1.0]).__class__(
                    id="q", ts=8.0, champion=rec(1).champion, candidate=rec(1).candidate
                )
            ],
            now=8.0,
        )
    ] == [1]


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        LabelJoin(max_pending_pairs=0)
    with pytest.raises(ValueError):
        LabelJoin(label_window_s=0)


def test_labels_that_will_never_meet_a_pair_are_counted_not_kept():
    join = LabelJoin()
    join.add_pairs([rec(1)], now=0.0)
    never = {"r1", "r2"}.__contains__
    # r1's pair is already waiting: it still joins; r2 will never get one: not kept;
    # r3 may still get one: it waits as before.
    matched = join.add_labels(
        [LabelEvent("r1", 1), LabelEvent("r2", 0), LabelEvent("r3", 1)],
        now=1.0,
        never_paired=never,
    )
    assert [r.id for r in matched] == ["r1"]
    assert join.pending_labels == 1 and join.stats.labels_not_gated == 1
    assert join.flush().labels[0][0].id == "r3"  # r2 is never reported unmatched
