"""Recorder throughput: sustained pairs/s written by SqlRecorder, and the live path's cost.

For each database (SQLite file; a throwaway PostgreSQL cluster, durable settings) and
each capture mode (none; every pair with a 1 KB input tensor, 256 float32), it submits
N pairs from the event loop as fast as it can and measures:

- pairs/s: N / (first submit -> last pair committed), i.e. sustained write throughput
  with the buffer never full (buffer_size >= N, so nothing is dropped);
- submit latency (p50/p99/max) while the writer thread is saturated;
- event-loop lag: how late a 1 ms timer fires while the writer is saturated, versus
  idle — the GIL the writer takes is what the live path would feel.

The machine is shared: the load average is printed with the numbers.

    python benchmarks/recorder_throughput.py                      # both databases
    python benchmarks/recorder_throughput.py --backend sqlite --pairs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gates.records import ModelResult, PairRecord
from storage.db import Database
from storage.entities import ModelInfo
from storage.migrate import upgrade
from storage.recorder import SqlRecorder
from storage.settings import StorageSettings
from storage.store import Store


def make_records(n: int, with_inputs: bool) -> list[PairRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = float(rng.uniform(0.5, 1.0))
        out.append(
            PairRecord(
                id=f"bench-{i}",
                ts=1_764_050_000.0 + i * 1e-3,
                # descriptors as the live mirror sets them (stored since migration 0003)
                champion=ModelResult(np.array([1 - p, p]), 3.0, None, "probs", "FP32", (2,)),
                candidate=ModelResult(
                    np.array([p, 1 - p]) if i % 10 == 0 else np.array([1 - p, p]),
                    4.0,
                    None,
                    "probs",
                    "FP32",
                    (2,),
                ),
                slices={"platform": "mobile" if i % 2 else "web"},
                features={"age": 20 + i % 50, "income": 1000.0 + i},
                inputs_digest=f"{i:064x}",
                inputs={"x": rng.normal(size=(1, 256)).astype(np.float32)} if with_inputs else None,
            )
        )
    return out


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def run_one(
    url: str, n: int, with_inputs: bool, batch_size: int, journal: str = "truncate"
) -> dict[str, Any]:
    db = Database(url, sqlite_journal=journal)
    upgrade(db)
    store = Store(db)
    rollout = store.create_rollout(
        ModelInfo("champion", "onnx", "a"), ModelInfo("cand", "onnx", "b")
    )
    settings = StorageSettings(
        url=url,
        capture="all" if with_inputs else "never",
        batch_size=batch_size,
        buffer_size=max(n, 1),
        flush_interval_ms=50,
    )
    records = make_records(n, with_inputs)

    # Idle loop lag, for comparison.
    idle: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(loop_lag(stop, idle))
    await asyncio.sleep(0.5)
    stop.set()
    await probe

    rec = SqlRecorder(db, rollout.id, settings)
    await rec.start()
    busy: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(loop_lag(stop, busy))
    submit_ns: list[int] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, n, 500):
        for r in records[start : start + 500]:
            s = time.perf_counter_ns()
            ok = rec.submit(r)
            submit_ns.append(time.perf_counter_ns() - s)
            assert ok
        await asyncio.sleep(0)  # let the probe (and anything else on the loop) run
    assert await rec.flush()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    await probe
    await rec.aclose()
    written = store.count_pairs(rollout.id)
    db.dispose()
    assert written == n, (written, n)
    us = [v / 1000 for v in submit_ns]
    return {
        "pairs": n,
        "inputs": "1 KB" if with_inputs else "none",
        "pairs_per_s": n / elapsed,
        "cpu_s_per_1k_pairs": cpu / n * 1000,
        "submit_us_p50": pct(us, 50),
        "submit_us_p99": pct(us, 99),
        "submit_us_max": max(us),
        "loop_lag_ms_p50_idle": pct(idle, 50) * 1e3,
        "loop_lag_ms_p99_idle": pct(idle, 99) * 1e3,
        "loop_lag_ms_p50_busy": pct(busy, 50) * 1e3,
        "loop_lag_ms_p99_busy": pct(busy, 99) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--sqlite-journal", choices=["truncate", "wal"], default="truncate", help="SQLite mode"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="mg-bench-") as tmp:
        for backend in backends:
            for with_inputs in (False, True):
                if backend == "sqlite":
                    url = f"sqlite:///{tmp}/bench-{int(with_inputs)}.sqlite"
                    res = asyncio.run(
                        run_one(url, args.pairs, with_inputs, args.batch_size, args.sqlite_journal)
                    )
                else:
                    from tests.support.postgres import PostgresServer

                    # Durable settings (fsync on), as a production server would run.
                    with PostgresServer(fast=False) as pg:
                        url = pg.create_database("bench")
                        res = asyncio.run(run_one(url, args.pairs, with_inputs, args.batch_size))
                res["backend"] = backend
                results.append(res)
                if not args.json:
                    print(
                        f"{backend:10s} inputs={res['inputs']:5s} "
                        f"{res['pairs_per_s']:8.0f} pairs/s  "
                        f"cpu {res['cpu_s_per_1k_pairs'] * 1000:5.0f} us/pair  "
                        f"submit p50 {res['submit_us_p50']:5.1f} us p99 {res['submit_us_p99']:6.1f}"
                        f" us  loop lag p99 idle {res['loop_lag_ms_p99_idle']:5.2f} ms busy "
                        f"{res['loop_lag_ms_p99_busy']:5.2f} ms",
                        flush=True,
                    )
    report = {
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"load average before {load_before}, after {report['load_avg_after']}, "
            f"{report['cpus']} CPUs"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
