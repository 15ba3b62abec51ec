"""Rate-limited logging of upstream failures that reach a client.

One line per (upstream, status) at most every ``interval_s``, carrying how many were
suppressed since the last line: a failing upstream under load must not flood the log,
and none of its failures may go unmentioned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable


class RateLimitedLog:
    """One line per key at most every ``interval_s``, with how many were suppressed.

    For failures that repeat on every tick while a dependency is down (the rollout's
    evaluation, evidence and decision writes during a database outage): the first one
    is logged at once with its traceback, the rest of the interval only counted, and the
    next line says how many there were, so nothing goes unmentioned and the log grows by
    a bounded number of records per interval and key, not per evaluation. Keys are the
    call sites' fixed names or (upstream, status) pairs (bounded sets). Thread-safe: the
    gates' worker thread logs through it as well as the event loop.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def log(
        self, key: Hashable, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log (True) or count as suppressed (False)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d more like it since the last line)"
            args = (*args, skipped)
        self._log.log(level, msg, *args, exc_info=exc_info)
        return True

    def suppressed(self, key: Hashable) -> int:
        """Failures counted for ``key`` since its last line."""
        with self._lock:
            return self._suppressed.get(key, 0)


class FailureLog:
    """Upstream failures that reach a client: one line per (upstream, status) at most every
    ``interval_s`` (the limiter above, keyed by both)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = RateLimitedLog(logger, interval_s, clock)

    def failure(self, upstream: str, status: int, reason: str) -> bool:
        """Log one failure (or count it as suppressed); True when a line was written."""
        return self._limit.log(
            (upstream, status),
            logging.WARNING,
            "upstream %s failed a client request: %d %s",
            upstream,
            status,
            reason[:500],
        )
