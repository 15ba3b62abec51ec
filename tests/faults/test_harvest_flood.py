"""A dead candidate turns every pair into a ``candidate_error`` match: the harvester
stores a capped number of cases, in batched transactions, and counts the rest.

Real SQLite file, real Store, the real Harvester and rules; the engine argument of the
hooks is unused when no case is pinned (None here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from sqlalchemy import event, func, select

from gates.records import ModelResult, PairRecord
from gates.settings import HarvestSettings
from proxy.control.harvest import BATCH, Harvester
from storage.db import Database
from storage.migrate import upgrade
from storage.schema import PinnedFailureRow
from storage.store import Store
from tests.storage.factories import CANDIDATE, CHAMPION


class FakeClock:
    """Deterministic window: the test moves time, not the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _failed(i: int) -> PairRecord:
    rng = np.random.default_rng(i)
    return PairRecord(
        id=f"r{i}",
        ts=1_764_050_000.0 + i,
        champion=ModelResult(output=np.array([0.2, 0.8]), latency_ms=1.0),
        candidate=ModelResult(output=None, latency_ms=None, error="connection refused"),
        inputs={"x": rng.normal(size=(1, 4)).astype(np.float32)},
        inputs_digest=f"d{i}",
    )


def _setup(tmp_path: Path, settings: HarvestSettings) -> tuple[Store, Harvester, list[int], Any]:
    db = Database(f"sqlite:///{tmp_path / 'h.sqlite'}")
    upgrade(db)
    store = Store(db)
    rollout = store.create_rollout(CHAMPION, CANDIDATE)
    commits = [0]
    event.listen(db.engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    clock = FakeClock()
    registry = CollectorRegistry()
    harvester = Harvester(
        store,
        settings,
        task="model",
        rollout_id=rollout.id,
        champion=CHAMPION,
        candidate=CANDIDATE,
        clock=clock,
        registry=registry,
    )
    return store, harvester, commits, (clock, registry)


def _rows(store: Store) -> int:
    with store.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(PinnedFailureRow)).scalar_one())


def test_flood_is_capped_per_window_and_counted(tmp_path: Path) -> None:
    settings = HarvestSettings(max_cases_per_window=30, window_s=60, max_cases_per_rollout=45)
    store, harvester, _commits, (clock, registry) = _setup(tmp_path, settings)
    records = [_failed(i) for i in range(500)]
    harvester.on_pairs(records[:250], None, 0.0)  # type: ignore[arg-type]
    assert harvester.flush(60)
    c = harvester.counters
    assert (c.matched, c.harvested, c.skipped_window, c.skipped_rollout_cap) == (250, 30, 220, 0)
    assert _rows(store) == 30
    # the next window admits more, until the rollout cap (45) is reached
    clock.now += 61
    harvester.on_pairs(records[250:], None, 0.0)  # type: ignore[arg-type]
    assert harvester.flush(60)
    assert (c.harvested, c.skipped_window, c.skipped_rollout_cap) == (45, 220, 235)
    assert _rows(store) == 45
    # answered matches = stored + every counted reason
    assert c.matched == c.harvested + c.recurrences + c.skipped_window + c.skipped_rollout_cap
    assert registry.get_sample_value(
        "mirrorgate_harvest_cases_total", {"outcome": "skipped_window"}
    ) == float(c.skipped_window)
    harvester.close()


def test_cases_are_written_in_batches_not_one_transaction_each(tmp_path: Path) -> None:
    n = 3 * BATCH
    settings = HarvestSettings(max_cases_per_window=n, max_cases_per_rollout=n)
    store, harvester, commits, _ = _setup(tmp_path, settings)
    before = commits[0]
    harvester.on_pairs([_failed(i) for i in range(n)], None, 0.0)  # type: ignore[arg-type]
    assert harvester.flush(60)
    assert _rows(store) == n
    assert harvester.counters.harvested == n
    # one transaction per batch of up to BATCH cases (never one per case)
    assert commits[0] - before <= math.ceil(n / BATCH) + 1 < n
    harvester.close()


def test_database_failure_is_counted_not_raised(tmp_path: Path) -> None:
    settings = HarvestSettings()
    store, harvester, _, (_, registry) = _setup(tmp_path, settings)
    store.db.dispose()
    (tmp_path / "h.sqlite").unlink()
    (tmp_path / "h.sqlite").mkdir()  # the path is now a directory: every write fails
    harvester.on_pairs([_failed(i) for i in range(10)], None, 0.0)  # type: ignore[arg-type]
    assert harvester.flush(60)
    assert harvester.counters.errors == 10
    assert harvester.counters.harvested == 0
    assert (
        registry.get_sample_value("mirrorgate_harvest_cases_total", {"outcome": "write_error"})
        == 10.0
    )
    harvester.close()
