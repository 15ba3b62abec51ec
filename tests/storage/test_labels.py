"""Labels: stored always, joined in either order, orphans reported (SQLite + PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading

from storage import labels as label_join
from storage.entities import LabelEntry
from storage.recorder import SqlRecorder
from tests.storage.factories import eventually, make_record
from tests.storage.test_recorder import settings


async def test_label_before_and_after_its_pair(db, store, rollout):
    joined: list[tuple[str, object, bool]] = []
    loop_thread = threading.get_ident()

    def on_joined(records):
        for r in records:
            joined.append((r.id, r.label, threading.get_ident() == loop_thread))

    rec = SqlRecorder(db, rollout.id, settings(str(db.url)), on_label_joined=on_joined)
    await rec.start()
    # Label first: kept pending until the pair lands.
    assert rec.submit_label("req-1", 1, ts=123.5)
    assert await rec.flush(timeout_s=60)
    assert store.label_counts().pending == 1
    rec.submit(make_record(1))
    # Pair first: joined when the label lands.
    rec.submit(make_record(2))
    assert await rec.flush(timeout_s=60)
    rec.submit_label("req-2", 0)
    assert await rec.flush(timeout_s=60)
    await eventually(lambda: len(joined) == 2, what="join callbacks")
    assert store.get_pairs("req-1")[0].label == 1
    assert store.get_pairs("req-2")[0].label == 0
    counts = store.label_counts()
    assert (counts.pending, counts.joined, counts.orphaned) == (0, 2, 0)
    # The callback runs on the event loop, with the labelled pair.
    assert sorted(joined) == [("req-1", 1, True), ("req-2", 0, True)]
    await rec.aclose()


async def test_a_later_label_corrects_an_earlier_one(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url)))
    await rec.start()
    rec.submit(make_record(5))
    rec.submit_label("req-5", 1)
    assert await rec.flush(timeout_s=60)
    rec.submit_label("req-5", 0)
    await rec.aclose()
    assert store.get_pairs("req-5")[0].label == 0


def test_sync_labels_and_orphans(store, rollout):
    now = 1_800_000_000.0
    store.write_pairs(rollout.id, [make_record(1, inputs=False)])
    joined = store.add_labels(
        [
            LabelEntry("req-1", 1, ts=now, received_at=now),
            LabelEntry("ghost", 0, ts=now, received_at=now),
        ],
        now=now,
    )
    assert [(r.id, r.label) for r in joined] == [("req-1", 1)]
    assert [e.request_id for e in store.pending_labels()] == ["ghost"]
    # Inside the window nothing is orphaned; after it, the label is reported.
    assert store.sweep_labels(window_s=3600, now=now + 60) == (0, 0)
    assert store.orphan_labels() == []
    assert store.sweep_labels(window_s=3600, now=now + 7200) == (0, 1)
    [orphan] = store.orphan_labels()
    assert (orphan.request_id, orphan.label, orphan.status) == ("ghost", 0, "orphaned")
    # Kept, not lost: should the pair turn up after all, it still joins.
    store.write_pairs(rollout.id, [make_record(9, rid="ghost", inputs=False)])
    assert store.get_pairs("ghost")[0].label == 0
    assert store.orphan_labels() == []
    assert store.label_counts().joined == 2


def test_sweep_joins_what_concurrent_writers_missed(db, store, rollout):
    """Replica A stores a label while replica B stores its pair: each may miss the other
    in its own transaction. The periodic sweep joins them."""
    store.write_pairs(rollout.id, [make_record(3, inputs=False)])
    with db.engine.begin() as conn:  # a label row written without the join step
        label_join.insert_labels(conn, [LabelEntry("req-3", 1, ts=1.0, received_at=1.0)])
    assert store.get_pairs("req-3")[0].label is None
    assert store.sweep_labels(window_s=3600, now=2.0) == (1, 0)
    assert store.get_pairs("req-3")[0].label == 1


async def test_labels_reach_the_callback_from_the_sweep(db, store, rollout):
    got: list[str] = []
    s = settings(str(db.url), purge_interval_s=0.05)
    store.write_pairs(rollout.id, [make_record(4, inputs=False)])
    with db.engine.begin() as conn:
        label_join.insert_labels(conn, [LabelEntry("req-4", 1, ts=1.0, received_at=1.0)])
    rec = SqlRecorder(db, rollout.id, s, on_label_joined=lambda rs: got.extend(r.id for r in rs))
    await rec.start()
    await eventually(lambda: got == ["req-4"], what="the periodic sweep")
    await rec.aclose()
    await asyncio.sleep(0)
