"""``python -m proxy serve`` with event-loop lag and GC pauses logged, for
benchmarks/fault_matrix.py ``--diagnose`` only.

Every process that runs this file as its main module (the live process; the shadow
worker, spawned, runs it again as ``__mp_main__``) appends lines to
``$FAULT_DIAG_DIR/<pid>.lag``; the benchmark itself calls :func:`probe` for its own
loop (``bench.lag``: the load generator and both upstreams run there, so its stalls are
in every measured latency too):

* ``lag <unix time> <ms>``: a 5 ms ``asyncio.sleep`` on the process's event loop woke
  more than 2 ms late (what every callback on that loop, a live request's included,
  waited at that moment);
* ``gc <unix time> <generation> <ms> <collected>``: a collection of generation 1 or 2
  and how long it stopped the process;
* ``fullgc <unix time> <ms> <objects> <type=count,...>``: a full collection forced by
  SIGUSR2 (the benchmark sends one between phases): what a full pass costs with the
  heap as it is, and the commonest types it traverses (counted before the pass).

``FAULT_NO_GC_FREEZE=1`` turns proxy/core/heap.py's freeze into a no-op (the A/B of
that change: ``--no-gc-freeze``).

Unix time, so the benchmark can put each line in its phase. The probe costs one timer a
5 ms (~200 wake-ups a second): compare phases of one diagnosed run with each other, not
with a run without it.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

_PERIOD_S = 0.005
_REPORT_MS = 2.0
_tasks: set[asyncio.Task[None]] = set()


class _Log:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)

    def write(self, line: str) -> None:
        self._file.write(line + "\n")


async def _lag_probe(log: _Log) -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(_PERIOD_S)
        late_ms = (time.perf_counter() - start - _PERIOD_S) * 1000
        if late_ms > _REPORT_MS:
            log.write(f"lag {time.time():.4f} {late_ms:.2f}")


def _watch_gc(log: _Log) -> None:
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] < 1:
            return
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            ms = (time.perf_counter() - started.pop("t")) * 1000
            log.write(f"gc {time.time():.4f} {info['generation']} {ms:.2f} {info['collected']}")

    gc.callbacks.append(on_gc)


def probe(path: str) -> None:
    """Log this process's GC pauses and its running loop's lag to ``path``; on SIGUSR2,
    time one full collection as the heap is now (``fullgc <unix time> <ms> <objects>``,
    objects: what a full pass traverses)."""
    log = _Log(path)
    _watch_gc(log)
    loop = asyncio.get_running_loop()
    task = loop.create_task(_lag_probe(log))
    _tasks.add(task)

    def full_pass() -> None:
        objects = gc.get_objects()
        tracked = len(objects)
        # What a full pass traverses, by type (the 6 commonest): what grows after start-up.
        census = collections.Counter(type(o).__qualname__ for o in objects).most_common(6)
        del objects
        start = time.perf_counter()
        gc.collect()
        ms = (time.perf_counter() - start) * 1000
        top = ",".join(f"{name}={n}" for name, n in census)
        log.write(f"fullgc {time.time():.4f} {ms:.2f} {tracked} {top}")

    loop.add_signal_handler(signal.SIGUSR2, full_pass)


def _install(directory: str) -> None:
    run = asyncio.run

    def probed_run(main: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def wrapped() -> Any:
            probe(os.path.join(directory, f"{os.getpid()}.lag"))
            return await main

        return run(wrapped(), **kwargs)

    asyncio.run = probed_run  # type: ignore[assignment]


if os.environ.get("FAULT_DIAG_DIR"):
    _install(os.environ["FAULT_DIAG_DIR"])

if os.environ.get("FAULT_NO_GC_FREEZE"):
    # The A/B of proxy/core/heap.py: serve as it was before (no frozen start-up heap).
    import proxy.core.heap

    proxy.core.heap.freeze_heap = lambda what: 0


if __name__ == "__main__":
    from proxy.cli.main import main

    raise SystemExit(main())
