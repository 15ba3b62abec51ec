"""Log lines leave the serving process through a bounded queue and a writer thread.

A log handler that writes to stderr blocks its caller when stderr blocks: a pipe nobody
reads (a wedged log collector, a parent that stopped reading) fills at 64 KiB, and the
next ``log.warning`` on the event loop then stops the whole proxy, live path included.
A database outage makes that likely: every failed gate-evaluation write logs a
traceback from the event loop (benchmarks/fault_matrix.py wedged that way, docs/faults.md
"Round 4"). Here the root logger's handlers run in one daemon thread fed by a bounded
queue; the event loop only formats the message and enqueues it, and when the queue is
full the record is dropped and counted, never waited for. The lines that do get out keep
their order and their format.

Every process of ``mirrorgate serve`` installs it: the first live process (``serve``
itself), the shadow worker and the extra live processes of ``server.workers > 1``
(:func:`configure_child_logging`, their ``multiprocessing`` entry points). The drops are
exported as ``mirrorgate_logging_dropped_total`` (:class:`DroppedLogRecords`, registered
on each app's registry; the live process's /metrics sums the worker's in).
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Records held while stderr is blocked: enough for a burst, bounded in memory.
DEFAULT_MAX_RECORDS = 10_000
_STOP = None


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """The stdlib's queue handler, except that a full queue drops and counts instead of
    reporting an error on the very stderr that is blocked, and that the traceback
    travels as ``exc_info`` (the JSON log format renders it as its own field)."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Freeze the message now (its arguments may change or die later).
        record.msg = record.getMessage()
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def _drain(records: queue.Queue[logging.LogRecord | None], handlers: list[logging.Handler]) -> None:
    while True:
        record = records.get()
        if record is _STOP:
            return
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        del record  # no traceback (and its frames) kept alive while waiting


def install_queued_logging(
    max_records: int = DEFAULT_MAX_RECORDS, stop_timeout_s: float = 2.0
) -> Callable[[], int]:
    """Move the root logger's handlers behind a queue and a writer thread. Returns
    ``restore``: flushes what it can within ``stop_timeout_s`` (a blocked stderr must not
    hold the exit either), puts the handlers back and returns the number of dropped
    records."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(max_records)
    front = _DroppingQueueHandler(records)
    writer = threading.Thread(
        target=_drain, args=(records, handlers), name="mirrorgate-log-writer", daemon=True
    )
    writer.start()
    root.handlers = [front]

    def restore() -> int:
        root.handlers = handlers
        try:
            records.put(_STOP, timeout=stop_timeout_s)
        except queue.Full:
            pass
        else:
            writer.join(stop_timeout_s)
        return front.dropped

    return restore


def dropped_records() -> int:
    """Records this process's queued logging dropped so far (0 when not installed)."""
    return sum(
        h.dropped for h in logging.getLogger().handlers if isinstance(h, _DroppingQueueHandler)
    )


class DroppedLogRecords(Collector):
    """``mirrorgate_logging_dropped_total``: read at scrape time from the handler the
    process installed (a log record is not an event of one app: the count is the
    process's, whichever registry asks)."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "mirrorgate_logging_dropped",
            "Log records dropped because the log queue was full (stderr blocked or slow)",
        )
        family.add_metric([], float(dropped_records()))
        yield family


def configure_child_logging(level: int, format: str) -> Callable[[], int]:
    """Logging for a ``multiprocessing`` (spawn) child of ``serve``: the same stderr
    handler format as before, behind the same bounded queue as the parent's (the child
    shares the parent's stderr, so the same blocked pipe would stop its event loop)."""
    logging.basicConfig(level=level, format=format)
    return install_queued_logging()
