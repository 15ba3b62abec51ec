"""The queued logging of every serve process (proxy/core/logqueue.py): a full queue drops
and counts, never waits, and the count is exported as ``mirrorgate_logging_dropped_total``.

The blocked stderr is a handler that waits on an event the test holds (the end-to-end
case, a real pipe nobody reads, is tests/faults/test_blocked_stderr.py): the counts are
exact by construction (one record in the writer's hands, ``max_records`` in the queue),
no timing involved.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.core.logqueue import configure_child_logging, dropped_records, install_queued_logging
from proxy.core.metrics import ProxyMetrics


class _Blocked(logging.Handler):
    """stderr that stopped being read: the writer thread waits in ``emit``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.unblock = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.unblock.wait(120)
        self.lines.append(record.getMessage())


@pytest.fixture
def root_handlers() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        root.handlers = saved
        root.setLevel(level)


def test_a_full_queue_drops_counts_and_exports_the_count(root_handlers: logging.Logger) -> None:
    blocked = _Blocked()
    root_handlers.handlers = [blocked]
    root_handlers.setLevel(logging.INFO)
    restore = install_queued_logging(max_records=5)
    log = logging.getLogger("tests.logqueue")
    try:
        log.warning("first")  # the writer takes it and blocks in the handler
        assert blocked.entered.wait(60)
        for i in range(20):
            log.warning("line %d", i)  # returns at once: 5 queued, 15 dropped
        assert dropped_records() == 15
        registry = CollectorRegistry()
        ProxyMetrics(registry)
        assert registry.get_sample_value("mirrorgate_logging_dropped_total") == 15.0
    finally:
        blocked.unblock.set()
        dropped = restore()
    assert dropped == 15
    # What was not dropped got out, in order, once stderr moved again.
    assert blocked.lines == ["first"] + [f"line {i}" for i in range(5)]
    assert dropped_records() == 0  # not installed any more
    registry = CollectorRegistry()
    ProxyMetrics(registry)
    assert registry.get_sample_value("mirrorgate_logging_dropped_total") == 0.0


def _child(conn: multiprocessing.connection.Connection) -> None:
    restore = configure_child_logging(logging.INFO, "%(message)s[child]")
    conn.send([type(h).__name__ for h in logging.getLogger().handlers])
    restore()


def test_a_spawned_child_logs_through_the_queue() -> None:
    """What the shadow worker and the extra live processes call first (spawned
    interpreters: the parent's logging setup does not carry over)."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs,))
    proc.start()
    try:
        assert ours.poll(120)
        assert ours.recv() == ["_DroppingQueueHandler"]
    finally:
        proc.join(60)
    assert proc.exitcode == 0
