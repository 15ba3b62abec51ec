"""The rollout's failure logs during a database outage are rate-limited (proxy/control/rollout.py).

During an outage every gate evaluation, every resume-state save and every retry of an
unpersisted decision fails, once per tick (~5 a second): before, each wrote a traceback
(what filled serve's stderr in benchmarks/fault_matrix.py, docs/faults.md "Round 4").
The store here is the real evidence store's interface with every write raising
``StorageError``, as the store does when the database refuses (fault injection, like
tests/proxy/control/test_lifecycle.py; a real outage of the recorder's database is
exercised by tests/faults/test_database_faults.py). Both clocks are injected: the
service's (each tick is one ``_step``, so the cadence is exact) and the log limiter's
(frozen, then moved past the interval): the assertions are on counts of log records,
never on elapsed time.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from gates.simulate import Scenario, records
from proxy.control.rollout import LOG_INTERVAL_S, RolloutService
from storage.errors import StorageError
from tests.proxy.conftest import make_config

EVERY_S = 1.0
TICKS = 60


class DownStore:
    """Every write refused, as the store raises while the database is down."""

    def __init__(self) -> None:
        self.calls = 0

    def _down(self, *args: Any) -> None:
        self.calls += 1
        raise StorageError("database is locked (injected outage)")

    record_evaluation = record_decision = save_state = _down


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _rollout_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxy.control.rollout"]


async def test_a_database_outage_during_many_evaluations_logs_a_bounded_number_of_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.control.rollout")
    config = make_config(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        rollout={"evaluate_every_s": EVERY_S, "evaluate_every_pairs": 1},
    )
    pairs = records(Scenario(), TICKS * 20 + 20, seed=3)
    clock = Clock(pairs[0].ts)
    log_clock = Clock(0.0)
    service = RolloutService(config, clock=clock, log_clock=log_clock)
    store = DownStore()
    service.store = store  # type: ignore[assignment]
    try:
        for i in range(TICKS):
            for record in pairs[i * 20 : (i + 1) * 20]:
                assert service.submit(record)
            clock.t += EVERY_S + 1
            await service._step(force=False)
            if i == 5:
                # An operator aborts during the outage: the decision write fails, and is
                # retried on every tick after (pairs still come: evaluated each tick).
                await service.manual("abort", "ana", "outage test")
        evaluations = service.counters.evaluations
        assert evaluations == TICKS + 1  # every tick and the abort evaluated; writes failed
        assert list(service.unpersisted), "the abort is waiting for the database"
        assert store.calls >= 2 * TICKS

        failures = [r for r in _rollout_records(caplog) if r.levelno >= logging.WARNING]
        # One line per kind of failing write (evaluation, resume state, decision retry)
        # plus the decision's own "NOT persisted yet" error, not one per tick.
        assert len(failures) <= 5, [r.getMessage() for r in failures]
        assert any("persisting a gate evaluation failed" in r.getMessage() for r in failures)
        assert all(r.exc_info is not None for r in failures if "failed" in r.getMessage())
        suppressed = service.failures.suppressed("persist_evaluation")
        assert suppressed == evaluations - 1

        # The interval passes: one more line per kind, saying how many were not logged.
        caplog.clear()
        log_clock.t += LOG_INTERVAL_S + 1
        for record in pairs[TICKS * 20 : TICKS * 20 + 20]:
            service.submit(record)
        clock.t += EVERY_S + 1
        await service._step(force=False)
        lines = [r.getMessage() for r in _rollout_records(caplog)]
        evaluation_lines = [m for m in lines if m.startswith("persisting a gate evaluation")]
        assert len(evaluation_lines) == 1
        more = re.search(r"\((\d+) more like it since the last line\)", evaluation_lines[0])
        assert more is not None and int(more.group(1)) == suppressed
        assert len(lines) <= 4, lines
    finally:
        service.store = None
        await service.aclose()
