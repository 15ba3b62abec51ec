"""SqlRecorder on SQLite and PostgreSQL: batching, bounds, outages, shutdown."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from storage.db import Database
from storage.errors import NotFoundError
from storage.recorder import SqlRecorder
from storage.settings import StorageSettings
from tests.storage.factories import eventually, make_record


def settings(url: str, **over: object) -> StorageSettings:
    base: dict[str, object] = {
        "url": url,
        "capture": "all",
        "batch_size": 10,
        "flush_interval_ms": 20,
        "retry_initial_ms": 10,
        "retry_max_ms": 50,
        "close_timeout_s": 30,
    }
    base.update(over)
    return StorageSettings.model_validate(base)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels or None) or 0.0


class Outage:
    """Takes the database away and brings it back: on SQLite another connection holds
    the write lock (writes fail with 'database is locked' after the busy timeout); on
    PostgreSQL the server is stopped (connection refused) and started again."""

    def __init__(self, backend: str, db: Database, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.db = db
        self.request = request
        self._lock: sqlite3.Connection | None = None
        self._pg = request.getfixturevalue("pg_server") if backend == "postgresql" else None
        self.is_down = False

    def down(self) -> None:
        if self._pg is not None:
            self._pg.stop()
        else:
            self._lock = sqlite3.connect(str(self.db.url.database), timeout=0)
            # IMMEDIATE: the write lock (what a stuck writer holds). EXCLUSIVE would
            # also lock readers out under the rollback journal (storage.sqlite_journal).
            self._lock.execute("BEGIN IMMEDIATE")
        self.is_down = True

    def up(self) -> None:
        if not self.is_down:
            return
        if self._pg is not None:
            self._pg.start()
        elif self._lock is not None:
            self._lock.rollback()
            self._lock.close()
            self._lock = None
        self.is_down = False


@pytest.fixture
def outage(backend: str, db: Database, request: pytest.FixtureRequest) -> Iterator[Outage]:
    o = Outage(backend, db, request)
    try:
        yield o
    finally:
        o.up()


async def test_pairs_land_in_batches_and_round_trip(db, store, rollout):
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings(str(db.url)), registry=reg)
    await rec.start()
    records = [make_record(i, label=i % 2 if i % 3 else None) for i in range(25)]
    assert all(rec.submit(r) for r in records)
    assert await rec.flush(timeout_s=60)
    assert store.count_pairs(rollout.id) == 25
    assert sample(reg, "mirrorgate_recorder_written_total") == 25
    assert sample(reg, "mirrorgate_recorder_buffer_depth") == 0
    back = list(store.iter_pairs(rollout.id, with_inputs=True))
    for original, stored in zip(records, back, strict=True):
        want = original.to_dict()
        got = stored.to_dict()
        assert got.pop("inputs_digest") and "inputs_digest" not in want  # filled in
        assert got == want
        assert original.inputs is not None and stored.inputs is not None
        np.testing.assert_array_equal(stored.inputs["x"], original.inputs["x"])
    await rec.aclose()


async def test_partial_batch_is_written_by_time(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), batch_size=1000, flush_interval_ms=30))
    await rec.start()
    for i in range(3):
        rec.submit(make_record(i))
    # No flush, no close: the writer's interval alone must write them.
    await eventually(lambda: store.count_pairs(rollout.id) == 3, what="a timed flush")
    await rec.aclose()


async def test_buffer_bound_drops_and_counts(db, store, rollout):
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), buffer_size=5), registry=reg)
    # Not started: nothing drains the buffer, so the bound is exact.
    results = [rec.submit(make_record(i)) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert sample(reg, "mirrorgate_recorder_dropped_total", reason="buffer_full") == 3
    assert sample(reg, "mirrorgate_recorder_buffer_depth") == 5
    assert rec.submit_label("req-0", 1) is False  # labels share the bound
    assert sample(reg, "mirrorgate_recorder_labels_dropped_total", reason="buffer_full") == 1
    await rec.aclose()
    assert store.count_pairs(rollout.id) == 5


async def test_database_down_mid_run(db, store, rollout, outage):
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), buffer_size=50), registry=reg)
    await rec.start()
    for i in range(20):
        rec.submit(make_record(i))
    assert await rec.flush(timeout_s=60)
    assert store.count_pairs(rollout.id) == 20

    outage.down()
    # The database is held down by this very thread: a submit that waited on it would
    # never return. Every submit answers, and past the bound answers False.
    accepted = sum(rec.submit(make_record(100 + i)) for i in range(200))
    dropped = sample(reg, "mirrorgate_recorder_dropped_total", reason="buffer_full")
    assert 50 <= accepted < 200
    assert dropped == 200 - accepted
    await eventually(
        lambda: sample(reg, "mirrorgate_recorder_write_errors_total", kind="transient") >= 2,
        what="failed, retried writes",
    )
    if backend_is_sqlite(db):  # readers still work under SQLite's write lock
        assert store.count_pairs(rollout.id) == 20

    outage.up()
    assert await rec.flush(timeout_s=120)
    for i in range(20):
        assert rec.submit(make_record(1000 + i))
    await rec.aclose()
    # Every accepted record landed; only the counted drops are missing.
    assert store.count_pairs(rollout.id) == 20 + accepted + 20
    assert sample(reg, "mirrorgate_recorder_written_total") == 20 + accepted + 20


def backend_is_sqlite(db: Database) -> bool:
    return db.dialect == "sqlite"


async def test_shutdown_writes_everything_accepted(db, store, rollout):
    reg = CollectorRegistry()
    s = settings(str(db.url), batch_size=10_000, flush_interval_ms=600_000)
    rec = SqlRecorder(db, rollout.id, s, registry=reg)
    await rec.start()
    for i in range(300):
        assert rec.submit(make_record(i))
    assert rec.submit_label("req-7", 1)
    await rec.aclose()
    assert store.count_pairs(rollout.id) == 300
    assert store.get_pairs("req-7")[0].label == 1
    assert rec.submit(make_record(999)) is False
    assert sample(reg, "mirrorgate_recorder_dropped_total", reason="closed") == 1
    await rec.aclose()  # idempotent


async def test_close_without_start_still_writes(db, store, rollout):
    rec = SqlRecorder(db, rollout.id, settings(str(db.url)))
    for i in range(12):
        rec.submit(make_record(i))
    await rec.aclose()
    assert store.count_pairs(rollout.id) == 12


async def test_shutdown_gives_up_when_the_database_stays_down(db, store, rollout, outage):
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings(str(db.url), close_timeout_s=0.3), registry=reg)
    await rec.start()
    outage.down()
    for i in range(30):
        assert rec.submit(make_record(i))
    await rec.aclose()  # returns although nothing could be written
    assert sample(reg, "mirrorgate_recorder_dropped_total", reason="shutdown") == 30
    assert sample(reg, "mirrorgate_recorder_written_total") == 0
    outage.up()
    assert store.count_pairs(rollout.id) == 0


async def test_a_bad_record_costs_only_itself(db, store, rollout):
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings(str(db.url)), registry=reg)
    await rec.start()
    rec.submit(make_record(0))
    rec.submit(make_record(1), rollout_id="no-such-rollout")  # foreign key violation
    rec.submit(make_record(2, label=[math.nan]))  # JSON cannot carry NaN
    rec.submit(make_record(3))
    assert await rec.flush(timeout_s=60)
    await rec.aclose()
    assert [r.id for r in store.iter_pairs(rollout.id)] == ["req-0", "req-3"]
    assert sample(reg, "mirrorgate_recorder_dropped_total", reason="rejected") == 1
    assert sample(reg, "mirrorgate_recorder_dropped_total", reason="encode") == 1
    assert sample(reg, "mirrorgate_recorder_write_errors_total", kind="rejected") >= 1


async def test_start_checks_the_rollout(db):
    rec = SqlRecorder(db, "missing", settings(str(db.url)))
    with pytest.raises(NotFoundError, match="missing"):
        await rec.start()


async def test_records_follow_the_current_rollout(db, store, rollout):
    from tests.storage.factories import CANDIDATE, CHAMPION

    second = store.create_rollout(CHAMPION, CANDIDATE, rollout_id="r-second")
    rec = SqlRecorder(db, rollout.id, settings(str(db.url)))
    await rec.start()
    rec.submit(make_record(0))
    rec.rollout_id = second.id
    rec.submit(make_record(1))
    await rec.aclose()
    assert [r.id for r in store.iter_pairs(rollout.id)] == ["req-0"]
    assert [r.id for r in store.iter_pairs(second.id)] == ["req-1"]


def test_recorder_refuses_an_in_memory_database():
    from storage.errors import InvalidError

    memory = Database("sqlite://")
    with pytest.raises(InvalidError, match="memory"):
        SqlRecorder(memory, "r", StorageSettings(url="sqlite://"))
    memory.dispose()
