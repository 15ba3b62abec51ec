"""Keep the garbage collector's full passes off the live path's latency.

CPython's cyclic collector stops every thread of the process while it runs, and a
full (generation 2) pass traverses every tracked object. In a serving process most of
them are created at start-up and live as long as the process: modules, classes and
functions of aiohttp, numpy, scipy, SQLAlchemy, prometheus_client, the app, the
backends, the store. Measured on the fault matrix (docs/faults.md, "Round 5"): a full
pass of ``mirrorgate serve`` traversed ~147,000 objects and took 100-350 ms on the
loaded 2-core machine, and the requests in flight meanwhile were most of a phase's
slowest 1%; after the freeze, 7,000-10,000 objects and 4-37 ms.

:func:`freeze_heap` collects once and then moves everything alive into the collector's
permanent generation (:func:`gc.freeze`), which later passes skip: a full pass then
traverses only what was created since. Objects keep being freed by reference counting
as before; only a reference *cycle* among frozen objects would never be collected
(start-up objects that become garbage in a cycle: none that we know of, and bounded by
the start-up heap). Called once a process has built what it serves with, before it
serves (``mirrorgate serve``: after the app's start-up and again once the models are
loaded; the shadow worker likewise).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_heap(what: str) -> int:
    """Collect, then freeze everything alive; returns how many objects are frozen now
    (all calls together). ``what``: the moment, for the log line."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "%s: %d objects frozen out of the collector's full passes (%.0f ms)",
        what,
        frozen,
        (time.perf_counter() - start) * 1000,
    )
    return frozen
