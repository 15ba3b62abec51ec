"""``python -m proxy serve`` with memory diagnostics, for benchmarks/soak.py only.

With ``SOAK_TRACE_DIR`` set, every process that runs this file starts tracemalloc and
writes a snapshot to ``$SOAK_TRACE_DIR/<pid>-<n>.snap`` on each SIGUSR1. The shadow
worker is started with ``spawn``, which runs the parent's main file again as
``__mp_main__`` in the child: the module-level code below therefore traces the live
process and the worker alike (the ``if __name__`` block runs only in the live one).

With ``SOAK_STATS_DIR`` set (``SOAK_STATS_S`` seconds apart, default 30), each process
appends a JSON line to ``$SOAK_STATS_DIR/stats-<pid>.jsonl``: /proc/self/smaps_rollup,
SQLite's own heap (``sqlite3_memory_used``: page caches, statements, schemas, which
tracemalloc does not see), the SQLAlchemy pools, gc counts, object counts by type and
the 25 largest containers with the attribute that holds them and their approximate size
(how the harvester's id memory and the capture cache were found, docs/faults.md "Round 5").
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
            try:
                fn()
            except Exception as exc:  # a diagnostic must not stop (a dict changed size...)
                print(f"soak diagnostics: {exc!r}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True, name="soak-diagnostics").start()


def _pymalloc_stats() -> None:
    # One line per call: pymalloc's arenas (256 KiB each) and what its blocks hold.
    sys._debugmallocstats()  # writes to the C stderr (serve.stderr)


if os.environ.get("SOAK_PYMALLOC_STATS_S"):
    _every(float(os.environ["SOAK_PYMALLOC_STATS_S"]), _pymalloc_stats)

if os.environ.get("SOAK_MALLOC_TRIM_S"):
    _libc = ctypes.CDLL("libc.so.6")
    _every(float(os.environ["SOAK_MALLOC_TRIM_S"]), lambda: _libc.malloc_trim(0))


def _sqlite_lib() -> Any:
    # The sqlite3 module links libsqlite3 dynamically here: dlopen gives the copy already
    # loaded, so its memory counters are this process's SQLite heap (page caches,
    # prepared statements, schema), which tracemalloc does not see.
    import sqlite3  # noqa: F401  (loads the library first)

    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    return lib


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _owner(o: Any) -> str:
    """``Type.attribute`` of the object holding ``o`` in an attribute (or ``?``)."""
    import gc

    for ref in gc.get_referrers(o):
        if isinstance(ref, dict):
            for holder in gc.get_referrers(ref):
                if getattr(holder, "__dict__", None) is ref:
                    names = [k for k, v in ref.items() if v is o]
                    return f"{type(holder).__qualname__}.{names[0] if names else '?'}"
        else:
            # 3.11 keeps instance attributes inline (no __dict__ until asked for one):
            # the referrer is then the instance itself.
            try:
                attrs = dict(vars(ref))
            except TypeError:
                attrs = {n: getattr(ref, n, None) for n in getattr(type(ref), "__slots__", ())}
            names = [k for k, v in attrs.items() if v is o]
            if names:
                return f"{type(ref).__qualname__}.{names[0]}"
    return "?"


def _approx_bytes(o: Any) -> int:
    """The container and its keys (and values when they are small scalars/strings)."""
    total = sys.getsizeof(o)
    items = o.items() if isinstance(o, dict) else ((k, None) for k in o)
    for k, v in items:
        total += sys.getsizeof(k)
        if isinstance(v, (str, bytes, int, float, tuple)):
            total += sys.getsizeof(v)
    return total


def _big_containers(limit: int = 25) -> list[list[Any]]:
    import collections
    import gc

    rows = []
    for o in gc.get_objects():
        if isinstance(o, (dict, list, set, collections.deque, frozenset)) and len(o) >= 500:
            try:
                first = repr(next(iter(o)))[:60]
            except Exception:  # a diagnostic: any first element will do
                first = "?"
            rows.append([type(o).__name__, len(o), id(o), first, o])
    rows.sort(key=lambda r: -r[1])
    out = []
    for i, row in enumerate(rows[:limit]):
        o = row.pop()
        if i < 8:
            row += [_owner(o), _approx_bytes(o)]
        out.append(row)
    return out


def _stats() -> None:
    import collections
    import gc
    import json

    lib = _STATS["lib"]
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    engines = [o for o in gc.get_objects() if type(o).__name__ == "Engine"]
    row = {
        "t": time.time(),
        "pid": os.getpid(),
        "rollup": _rollup(),
        "sqlite_used": lib.sqlite3_memory_used(),
        "sqlite_highwater": lib.sqlite3_memory_highwater(0),
        "pools": [e.pool.status() for e in engines],
        "gc_count": gc.get_count(),
        "gc_stats": gc.get_stats(),
        "threads": threading.active_count(),
        "objects": sum(counts.values()),
        "types": counts.most_common(60),
        "big": _big_containers(),
    }
    with open(os.path.join(str(_STATS_DIR), f"stats-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


_STATS_DIR = os.environ.get("SOAK_STATS_DIR")
_STATS: dict[str, Any] = {}
if _STATS_DIR:
    _STATS["lib"] = _sqlite_lib()
    _every(float(os.environ.get("SOAK_STATS_S", "30")), _stats)


if __name__ == "__main__":
    from proxy.cli.main import main

    raise SystemExit(main())
