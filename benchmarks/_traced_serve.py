"""``python -m proxy serve`` with memory diagnostics, for benchmarks/soak.py only.

With ``SOAK_TRACE_DIR`` set, every process that runs this file starts tracemalloc and
writes a snapshot to ``$SOAK_TRACE_DIR/<pid>-<n>.snap`` on each SIGUSR1. The shadow
worker is started with ``spawn``, which runs the parent's main file again as
``__mp_main__`` in the child: the module-level code below therefore traces the live
process and the worker alike (the ``if __name__`` block runs only in the live one).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from types import FrameType
from typing import Any

_DIR = os.environ.get("SOAK_TRACE_DIR")
_dumps = [0]


def _dump(signum: int, frame: FrameType | None) -> None:
    assert _DIR is not None
    _dumps[0] += 1
    path = os.path.join(_DIR, f"{os.getpid()}-{_dumps[0]}.snap")
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)  # the soak waits for the final name


if _DIR:
    tracemalloc.start(int(os.environ.get("SOAK_TRACE_FRAMES", "4")))
    signal.signal(signal.SIGUSR1, _dump)

_CACHE_KIB = os.environ.get("SOAK_SQLITE_CACHE_KIB")
if _CACHE_KIB:
    # A/B of SQLite's page cache (C memory tracemalloc does not see): each engine the
    # store creates gets one more connect listener, after the store's own pragmas.
    from sqlalchemy import event

    import storage.db as _db

    _pragmas = _db._sqlite_pragmas

    def _with_cache(engine: Any, **kwargs: Any) -> None:
        _pragmas(engine, **kwargs)

        @event.listens_for(engine, "connect")
        def _cache(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA cache_size=-{int(str(_CACHE_KIB))}")
            cur.close()

    _db._sqlite_pragmas = _with_cache

if os.environ.get("SOAK_SQLITE_NO_STATEMENT_CACHE"):
    # A/B of the sqlite3 module's prepared-statement cache (128 per connection, C memory).
    import sqlite3
    import sqlite3.dbapi2

    _connect = sqlite3.dbapi2.connect

    def _uncached(*args: Any, **kwargs: Any) -> Any:
        kwargs["cached_statements"] = 0
        return _connect(*args, **kwargs)

    sqlite3.connect = sqlite3.dbapi2.connect = _uncached


def _every(seconds: float, fn: Callable[[], object]) -> None:
    def loop() -> None:
        while True:
            time.sleep(seconds)
            fn()

    threading.Thread(target=loop, daemon=True, name="soak-diagnostics").start()


def _pymalloc_stats() -> None:
    # One line per call: pymalloc's arenas (256 KiB each) and what its blocks hold.
    sys._debugmallocstats()  # writes to the C stderr (serve.stderr)


if os.environ.get("SOAK_PYMALLOC_STATS_S"):
    _every(float(os.environ["SOAK_PYMALLOC_STATS_S"]), _pymalloc_stats)

if os.environ.get("SOAK_MALLOC_TRIM_S"):
    _libc = ctypes.CDLL("libc.so.6")
    _every(float(os.environ["SOAK_MALLOC_TRIM_S"]), lambda: _libc.malloc_trim(0))


if __name__ == "__main__":
    from proxy.cli.main import main

    raise SystemExit(main())
