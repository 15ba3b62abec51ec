"""The fault matrix under steady load, in one run: live latency and failures per phase.

A real ``mirrorgate serve`` child process (SQLite storage, harvesting on, the candidate
circuit breaker at its defaults) sits between an open-loop load generator (RATE
requests/s, each on a pooled connection) and two real V2 upstreams in this process.
Phases, PHASE_S seconds each, in this order: baseline; candidate answering 500,
garbage, resetting connections mid-body, hung, refusing connections; candidate back;
database write lock held by another process (SQLite "down"); database file deleted;
champion hung; champion back; SIGTERM under load. (Root ignores file permissions on
this machine, so "read-only" is played by the held write lock; a PostgreSQL restart is
covered by tests/faults/test_database_faults.py, not here.)

Per phase: live p50/p99 of answered requests, live failures (anything but 200), and at
the end the pair accounting read from ``/metrics`` before the SIGTERM:
answered = written + recorder drops + shadow drops (+ still buffered).

    python benchmarks/fault_matrix.py [--rate 100] [--phase-s 6] [--warmup-s 5] [--json]
        [--shadow-process | --both]

The load runs ``--warmup-s`` seconds before the baseline phase starts (not reported), so
the reference p99 carries no connection set-up or first-use cost. For a p99 that is not
just the second-slowest request, give each phase >= 1000 requests (``--rate 35
--phase-s 30``). Failures are broken down by status (``failure_statuses``; -1: no
answer within the client's 10 s).

``--shadow-process`` runs the proxy with ``shadow.process: true`` (candidate calls,
decoding, recorder, gates and harvester in the shadow worker process, docs/shadow-worker.md);
``--both`` runs the matrix in-process and then with the worker, one after the other in
the same invocation, and prints the two side by side (p99 / own baseline per phase).

The machine is shared (2 cores, many agents): the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.helpers import body, ready, start_serve, stop, tail, until
from tests.proxy.conftest import N_CLASSES, N_FEATURES
from tests.proxy.upstream import Upstream, UpstreamModel


class Server:
    """A V2 upstream on a fixed port that can be stopped (refused) and started again."""

    def __init__(self, seed: int) -> None:
        self.upstream = Upstream(UpstreamModel(N_FEATURES, N_CLASSES, seed), seed=seed)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(self.upstream.app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            self.upstream.release()
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Load:
    def __init__(self, base: str, rate: float) -> None:
        self.base = base
        self.rate = rate
        self.results: list[tuple[float, int, float]] = []  # (t, status, latency_s)
        self.running = True
        self.sent = 0

    async def one(self, session: aiohttp.ClientSession, i: int) -> None:
        start = time.perf_counter()
        try:
            async with session.post(
                f"{self.base}/v2/models/classifier/infer", json=body(i)
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = -1
        self.results.append((start, status, time.perf_counter() - start))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=256)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            t0 = time.perf_counter()
            while self.running:
                self.sent += 1
                task = asyncio.create_task(self.one(session, self.sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, t0 + self.sent / self.rate - time.perf_counter()))
            if tasks:
                await asyncio.wait(tasks, timeout=15)


def summarize(name: str, rows: list[tuple[float, int, float]]) -> dict[str, Any]:
    ok = np.array([lat for _, status, lat in rows if status == 200]) * 1000
    failures = sum(1 for _, status, _ in rows if status != 200)
    statuses: dict[str, int] = {}  # what the failures were (-1: no answer in 10 s)
    for _, status, _ in rows:
        if status != 200:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "phase": name,
        "requests": len(rows),
        "live_failures": failures,
        "failure_statuses": statuses,
        "p50_ms": float(np.percentile(ok, 50)) if ok.size else float("nan"),
        "p99_ms": float(np.percentile(ok, 99)) if ok.size else float("nan"),
    }


async def metrics(base: str) -> dict[str, float]:
    # A bounded wait: a wedged serve fails the benchmark instead of hanging it for ever
    # (aiohttp's default is 300 s per call, times 3000 polls).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def total(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


async def main(
    rate: float, phase_s: float, shadow_process: bool = False, warmup_s: float = 0.0
) -> dict[str, Any]:
    champion, candidate = Server(1), Server(2)
    await champion.start()
    await candidate.start()
    tmp = Path(tempfile.mkdtemp(prefix="mg-faults-"))
    db_path = tmp / "pairs.sqlite"

    def model(name: str, url: str, timeout_ms: float) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "http",
            "url": url,
            "model": "model",
            "timeout_ms": timeout_ms,
        }

    config = {
        "server": {"model_name": "classifier", "shutdown_timeout_s": 15},
        "models": {
            "champion": model("champion", champion.url, 1000),
            "candidate": model("candidate", candidate.url, 1000),
        },
        "mirror": {"timeout_ms": 500},
        "storage": {"url": f"sqlite:///{db_path}", "flush_interval_ms": 100},
        "shadow": {"process": shadow_process},
    }
    # serve's stderr goes to a file: an unread pipe fills at 64 KiB (the database phases
    # log a line per failed flush) and then blocks serve in a write, event loop and all;
    # that is what wedged rounds 3's runs after "champion back".
    log = tmp / "serve.stderr"
    proc, base = await start_serve(config, tmp, log)
    await until(lambda: ready(base), "proxy ready")
    load = Load(base, rate)
    runner = asyncio.create_task(load.run())
    phases: list[dict[str, Any]] = []
    lock: sqlite3.Connection | None = None

    async def phase(name: str) -> None:
        start = time.perf_counter()
        await asyncio.sleep(phase_s)
        rows = [r for r in load.results if start <= r[0] < time.perf_counter() - 0.0]
        phases.append({**summarize(name, rows), "serve_stderr_bytes": log.stat().st_size})
        print(json.dumps(phases[-1]), flush=True)

    try:
        if warmup_s > 0:
            # Not reported: the first seconds carry connection set-up and first-use costs
            # (and any start-up burst on a shared machine), which no fault phase has.
            await asyncio.sleep(warmup_s)
        await phase("baseline")
        for mode, label in (
            ("error", "candidate 500"),
            ("garbage", "candidate garbage"),
            ("crash", "candidate resets"),
            ("hang", "candidate hung"),
        ):
            candidate.upstream.set_fault(mode)
            await phase(label)
        await candidate.stop()
        await phase("candidate refused")
        candidate.upstream.set_fault("normal")
        await candidate.start()
        await phase("candidate back")
        lock = sqlite3.connect(db_path, timeout=0, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the writer cannot commit: the database is "down"
        await phase("database locked")
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        await phase("database back")
        db_path.unlink()
        await phase("database deleted")
        champion.upstream.set_fault("hang")
        await phase("champion hung")
        champion.upstream.set_fault("normal")
        await phase("champion back")
        # accounting before the SIGTERM (the metrics leave with the process)
        load.running = False
        await runner
        answered = sum(1 for _, status, _ in load.results if status == 200)
        await until(lambda: _settled(proc, base, log), "shadow work and recorder settled", 3000)
        m = await metrics(base)
        accounting = {
            "answered": answered,
            "written": total(m, "mirrorgate_recorder_written_total"),
            "recorder_dropped": {
                k.split('"')[1]: v
                for k, v in m.items()
                if k.startswith("mirrorgate_recorder_dropped_total{") and v
            },
            "shadow_dropped": {
                k.split('"')[1]: v
                for k, v in m.items()
                if k.startswith("mirrorgate_shadow_dropped_total{") and v
            },
            "harvest": {
                k.split('"')[1]: v
                for k, v in m.items()
                if k.startswith("mirrorgate_harvest_cases_total{") and v
            },
            "circuit_transitions": {
                k.split('"')[1]: v
                for k, v in m.items()
                if k.startswith("mirrorgate_shadow_circuit_transitions_total{") and v
            },
        }
        accounted = (
            accounting["written"]
            + sum(accounting["recorder_dropped"].values())
            + sum(accounting["shadow_dropped"].values())
        )
        accounting["accounted"] = accounted
        accounting["exact"] = accounted == answered
        # SIGTERM under load: every accepted request must be answered
        load2 = Load(base, rate)
        runner = asyncio.create_task(load2.run())
        await asyncio.sleep(phase_s / 2)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
        load2.running = False
        await runner
        accepted = [r for r in load2.results if r[1] != -1]
        phases.append(
            {
                **summarize("SIGTERM", accepted),
                "refused_after_close": sum(1 for r in load2.results if r[1] == -1),
                "exit_code": code,
            }
        )
        print(json.dumps(phases[-1]), flush=True)
    finally:
        load.running = False
        if lock is not None:
            lock.close()
        await stop(proc, log)
        await champion.stop()
        await candidate.stop()
    return {"phases": phases, "accounting": accounting}


async def _settled(proc: asyncio.subprocess.Process, base: str, log: Path) -> bool:
    if proc.returncode is not None:
        raise AssertionError(f"serve exited ({proc.returncode}) before accounting:\n{tail(log)}")
    m = await metrics(base)
    return (
        total(m, "mirrorgate_shadow_in_flight") == 0
        and total(m, "mirrorgate_shadow_queue_depth") == 0
        and total(m, "mirrorgate_recorder_buffer_depth") == 0
    )


def _run(rate: float, phase_s: float, shadow_process: bool, warmup_s: float) -> dict[str, Any]:
    load_before = os.getloadavg()
    report = asyncio.run(main(rate, phase_s, shadow_process, warmup_s))
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    report["rate"] = rate
    report["shadow_process"] = shadow_process
    base = report["phases"][0]["p99_ms"]
    for p in report["phases"]:
        p["p99_vs_baseline"] = p["p99_ms"] / base if base else float("nan")
    return report


def _table(report: dict[str, Any]) -> None:
    print("shadow.process:", report["shadow_process"])
    head = ("phase", "n", "fail", "p50 ms", "p99 ms", "p99/base")
    print("{:22s} {:>5s} {:>5s} {:>8s} {:>8s} {:>8s}".format(*head))
    for p in report["phases"]:
        print(
            f"{p['phase']:22s} {p['requests']:5d} {p['live_failures']:5d} "
            f"{p['p50_ms']:8.2f} {p['p99_ms']:8.2f} {p['p99_vs_baseline']:8.2f}"
        )
    print("accounting:", json.dumps(report["accounting"]))
    print("load average:", report["load_average"])


def _side_by_side(a: dict[str, Any], b: dict[str, Any]) -> None:
    head = ("phase", "in-proc p99", "x base", "worker p99", "x base")
    print("{:22s} {:>12s} {:>7s} {:>12s} {:>7s}".format(*head))
    for p, q in zip(a["phases"], b["phases"], strict=True):
        print(
            f"{p['phase']:22s} {p['p99_ms']:12.2f} {p['p99_vs_baseline']:7.2f} "
            f"{q['p99_ms']:12.2f} {q['p99_vs_baseline']:7.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--phase-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=5.0, help="unreported load first")
    parser.add_argument("--json", action="store_true")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shadow-process", action="store_true", help="shadow.process: true")
    mode.add_argument("--both", action="store_true", help="in-process, then the worker")
    args = parser.parse_args()
    modes = [False, True] if args.both else [args.shadow_process]
    reports = [_run(args.rate, args.phase_s, m, args.warmup_s) for m in modes]
    if args.json:
        print(json.dumps(reports if args.both else reports[0], indent=2))
    else:
        for report in reports:
            _table(report)
        if args.both:
            _side_by_side(*reports)
