"""A single proxy's gate loop after the rollout ended (proxy/control/rollout.py).

The store here records what ``RolloutService`` hands it (one ``record_evaluation`` call
is one gate_evaluations row in ``proxy.control.persistence``); the real store is exercised by
the storage and replicas tests. The clock is the service's injected one, and each tick
is the step its loop runs (``_step(force=False)``), so cadence is exact, not timed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gates.engine import Decision, Evaluation
from gates.join import LabelEvent
from gates.simulate import Scenario, records
from proxy.control.rollout import RolloutService
from tests.proxy.conftest import make_config

EVERY_S = 10.0


class RecordingStore:
    def __init__(self) -> None:
        self.evaluations: list[Evaluation] = []
        self.decisions: list[Decision] = []

    def record_evaluation(self, evaluation: Evaluation) -> None:
        self.evaluations.append(evaluation)

    def record_decision(self, decision: Decision) -> None:
        self.decisions.append(decision)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_an_ended_rollout_is_evaluated_again_only_when_its_evidence_changes() -> None:
    config = make_config(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        rollout={"evaluate_every_s": EVERY_S, "evaluate_every_pairs": 10_000},
    )
    pairs = [dataclasses.replace(r, label=None) for r in records(Scenario(), 5, seed=1)]
    clock = Clock(pairs[0].ts)
    service = RolloutService(config, clock=clock)
    store = RecordingStore()
    service.store = store
    try:

        async def tick() -> Any:
            clock.t += EVERY_S + 1  # the time cadence is due on every tick
            return await service._step(force=False)

        for record in pairs:
            assert service.submit(record)
        await tick()
        assert len(store.evaluations) == 1  # running: every due tick evaluates
        await tick()
        assert len(store.evaluations) == 2

        ended = await service.manual("abort", "ana", "bad candidate")
        assert ended.verdict == "abort" and len(store.decisions) == 1
        rows = len(store.evaluations)
        for _ in range(5):
            await tick()
        assert len(store.evaluations) == rows  # same evidence: no new row
        assert service.counters.evaluations == rows

        # A label for a pair recorded before the abort reaches the gates: evaluated once.
        service.submit_labels([LabelEvent(pairs[0].id, 1)])
        latest = await tick()
        assert len(store.evaluations) == rows + 1
        assert latest.labels == 1 and latest.verdict == "abort"
        for _ in range(5):
            await tick()
        assert len(store.evaluations) == rows + 1
        # An operator's explicit look is always evaluated.
        await service.evaluate_now()
        assert len(store.evaluations) == rows + 2
    finally:
        await service.aclose()
