"""Rate-limited logging of upstream failures that reach a client.

One line per (upstream, status) at most every ``interval_s``, carrying how many were
suppressed since the last line: a failing upstream under load must not flood the log,
and none of its failures may go unmentioned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class FailureLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[tuple[str, int], float] = {}
        self._suppressed: dict[tuple[str, int], int] = {}

    def failure(self, upstream: str, status: int, reason: str) -> bool:
        """Log one failure (or count it as suppressed); True when a line was written."""
        key = (upstream, status)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        self._log.warning(
            "upstream %s failed a client request: %d %s%s",
            upstream,
            status,
            reason[:500],
            f" ({skipped} more like it since the last line)" if skipped else "",
        )
        return True
