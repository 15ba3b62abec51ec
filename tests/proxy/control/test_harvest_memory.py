"""The harvester's dedup memory is bounded by the pairs still waiting for a label.

Before, every matched pair's id was remembered until 100,000 of them (~16 MiB): with
labels and harvesting on, a soak's memory rose over its first ~120k requests
(docs/faults.md, "Round 5"). A pair is labelled at most once, so its id is forgotten
when the ``wrong_label`` rule has looked at it. Real SQLite file, real Store, the real
Harvester and rules; the engine argument of the hooks is unused when no case is pinned.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gates.records import ModelResult, PairRecord
from gates.settings import HarvestSettings
from proxy.control import harvest
from proxy.control.harvest import Harvester
from storage.db import Database
from storage.migrate import upgrade
from storage.store import Store
from tests.storage.factories import CANDIDATE, CHAMPION


def _pair(i: int, *, candidate_fails: bool) -> PairRecord:
    rng = np.random.default_rng(i)
    out = np.array([0.2, 0.8])
    candidate = (
        ModelResult(output=None, latency_ms=None, error="connection refused")
        if candidate_fails
        else ModelResult(output=out, latency_ms=1.0)
    )
    return PairRecord(
        id=f"r{i}",
        ts=1_764_050_000.0 + i,
        champion=ModelResult(output=out, latency_ms=1.0),
        candidate=candidate,
        inputs={"x": rng.normal(size=(1, 4)).astype(np.float32)},
        inputs_digest=f"d{i}",
    )


@pytest.fixture
def harvester(tmp_path: Path) -> Harvester:
    db = Database(f"sqlite:///{tmp_path / 'h.sqlite'}")
    upgrade(db)
    store = Store(db)
    rollout = store.create_rollout(CHAMPION, CANDIDATE)
    h = Harvester(
        store,
        HarvestSettings(max_cases_per_window=10_000, max_cases_per_rollout=10_000),
        task="model",
        rollout_id=rollout.id,
        champion=CHAMPION,
        candidate=CANDIDATE,
        registry=CollectorRegistry(),
    )
    yield h
    h.close()


def _labelled(records: list[PairRecord]) -> list[PairRecord]:
    # Class 0: both models' top class is 1, so wrong_label matches every one.
    return [dataclasses.replace(r, label=0) for r in records]


def test_a_labelled_pair_is_harvested_once_and_then_forgotten(harvester: Harvester) -> None:
    failed = [_pair(i, candidate_fails=True) for i in range(300)]
    harvester.on_pairs(failed, None, 0.0)  # type: ignore[arg-type]
    assert harvester.counters.matched == 300  # candidate_error, label-free
    assert harvester.remembered_ids == 300  # their labels may still come
    harvester.on_labelled(_labelled(failed), None, 0.0)  # type: ignore[arg-type]
    # wrong_label matches them too, but they were harvested already: once per pair.
    assert harvester.counters.matched == 300
    assert harvester.remembered_ids == 0  # labelled: no rule will look at them again

    ok = [_pair(i, candidate_fails=False) for i in range(300, 600)]
    harvester.on_pairs(ok, None, 0.0)  # type: ignore[arg-type]
    assert harvester.counters.matched == 300 and harvester.remembered_ids == 0
    harvester.on_labelled(_labelled(ok), None, 0.0)  # type: ignore[arg-type]
    assert harvester.counters.matched == 600  # wrong_label, first match
    assert harvester.remembered_ids == 0
    assert harvester.flush(60)
    assert harvester.counters.harvested == 600


def test_a_labelled_stream_keeps_no_ids_and_unlabelled_pairs_hit_the_cap(
    harvester: Harvester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The soak's traffic: every pair matched on arrival and labelled soon after.
    for start in range(0, 2000, 100):
        batch = [_pair(i, candidate_fails=True) for i in range(start, start + 100)]
        harvester.on_pairs(batch, None, 0.0)  # type: ignore[arg-type]
        harvester.on_labelled(_labelled(batch), None, 0.0)  # type: ignore[arg-type]
    assert harvester.counters.matched == 2000
    assert harvester.remembered_ids == 0
    # Pairs that never get a label: kept up to the backstop (the join's own bound).
    monkeypatch.setattr(harvest, "SEEN_IDS", 150)
    never = [_pair(i, candidate_fails=True) for i in range(5000, 5400)]
    harvester.on_pairs(never, None, 0.0)  # type: ignore[arg-type]
    assert harvester.remembered_ids == 150
    assert harvester.counters.matched == 2400
