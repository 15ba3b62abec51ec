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
        [--shadow-process | --both] [--phases baseline,...] [--cycles N]
        [--diagnose [--no-gc-freeze]]

The load runs ``--warmup-s`` seconds before the baseline phase starts (not reported), so
the reference p99 carries no connection set-up or first-use cost. For a p99 that is not
just the second-slowest request, give each phase >= 1000 requests (``--rate 35
--phase-s 30``). Failures are broken down by status (``failure_statuses``; -1: no
answer within the client's 10 s).

``--shadow-process`` runs the proxy with ``shadow.process: true`` (candidate calls,
decoding, recorder, gates and harvester in the shadow worker process, docs/shadow-worker.md);
``--both`` runs the matrix in-process and then with the worker, one after the other in
the same invocation, and prints the two side by side (p99 / own baseline per phase).

``--phases a,b,...`` runs only those phases, in that order (always starting with
``baseline``); ``--cycles N`` repeats that sequence N times, each cycle against its own
baseline (interleaved A/B of a fault against the baseline on a noisy machine). Each
phase sets the state it needs whatever the previous one left (candidate up and healthy,
failing, or stopped; database lock; champion fault); ``baseline`` and ``candidate
back`` first wait, with the load running and not reported, until the candidate's
circuit is closed again.

Per phase, besides latency and failures: serve's CPU per request sent (all its threads),
this process's, the seconds serve's event-loop thread waited on a run queue (the
machine's other processes), the circuit state at the end and what the proxy did
(candidate calls, circuit-open drops, candidate failures, pairs written, circuit
transitions). ``--diagnose`` runs serve through benchmarks/_lag_serve.py and adds the
event-loop lag and GC pauses of serve and of this process, how many of the phase's
slowest 1% were in flight during a full collection or a stall, and the cost of one
forced full collection of serve after each phase (``--no-gc-freeze`` with it: serve
without proxy/core/heap.py's freeze, the A/B).

The machine is shared (2 cores, many agents): the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.helpers import ROOT, body, log_file, ready, start_serve, stop, tail, until
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


# The phases in matrix order; each names a state of the world (``world`` below sets it).
PHASES = (
    "baseline",
    "candidate 500",
    "candidate garbage",
    "candidate resets",
    "candidate hung",
    "candidate refused",
    "candidate back",
    "database locked",
    "database back",
    "database deleted",
    "champion hung",
    "champion back",
    "SIGTERM",
)
CANDIDATE_FAULTS = {
    "candidate 500": "error",
    "candidate garbage": "garbage",
    "candidate resets": "crash",
    "candidate hung": "hang",
}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread waited on a run queue (/proc schedstat)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# Counters whose change over a phase says what the proxy did in it.
_DELTA_PREFIXES = {
    "candidate_calls": "mirrorgate_proxy_requests_total{code",
    "circuit_open_drops": 'mirrorgate_shadow_dropped_total{reason="circuit_open"}',
    "shadow_failures": "mirrorgate_shadow_failures_total",
    "pairs_written": "mirrorgate_recorder_written_total",
    "circuit_transitions": "mirrorgate_shadow_circuit_transitions_total",
}


def _deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, prefix in _DELTA_PREFIXES.items():
        if name == "candidate_calls":
            keys = [k for k in after if k.startswith(prefix) and 'role="candidate"' in k]
        else:
            keys = [k for k in after if k == prefix or k.startswith(prefix + "{")]
        out[name] = sum(after[k] - before.get(k, 0.0) for k in keys)
    return out


async def main(
    rate: float,
    phase_s: float,
    shadow_process: bool = False,
    warmup_s: float = 0.0,
    selected: tuple[str, ...] = PHASES,
    cycles: int = 1,
    diagnose: bool = False,
    gc_freeze: bool = True,
) -> dict[str, Any]:
    sigterm = "SIGTERM" in selected
    selected = tuple(p for p in selected if p != "SIGTERM")
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
    if diagnose:
        proc, base = await _start_diagnosed(config, tmp, log, gc_freeze)
    else:
        proc, base = await start_serve(config, tmp, log)
    await until(lambda: ready(base), "proxy ready")
    # This process is the client and both upstreams: its own full GC passes (~100 ms
    # here) would be in the measured latencies. Its start-up heap is frozen out of them,
    # as serve's is (proxy/core/heap.py).
    gc.collect()
    gc.freeze()
    if diagnose:
        from benchmarks._lag_serve import probe

        probe(str(tmp / "bench.lag"))
    load = Load(base, rate)
    runner = asyncio.create_task(load.run())
    phases: list[dict[str, Any]] = []
    lock: sqlite3.Connection | None = None
    circuit_wait: dict[str, float] = {}

    async def phase(name: str, cycle: int) -> dict[str, Any]:
        before = await metrics(base)
        cpu0, own0, start = _cpu_s(proc.pid), _own_cpu_s(), time.perf_counter()
        wait0, wall0 = _runqueue_wait_s(proc.pid), time.time()
        await asyncio.sleep(phase_s)
        cpu1, own1, end = _cpu_s(proc.pid), _own_cpu_s(), time.perf_counter()
        wait1, wall1 = _runqueue_wait_s(proc.pid), time.time()
        after = await metrics(base)
        rows = [r for r in load.results if start <= r[0] < end]
        return {
            **summarize(name, rows),
            "cycle": cycle,
            "waited_for_circuit_close_s": round(circuit_wait.pop(name, 0.0), 1),
            "serve_stderr_bytes": log.stat().st_size,
            # Where the CPU went during the phase: serve (all its threads) and this
            # process (load generator and both upstreams), ms per request sent.
            "serve_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / max(1, len(rows)),
            "bench_cpu_ms_per_request": 1000 * (own1 - own0) / max(1, len(rows)),
            # Seconds serve's main thread (the event loop) was runnable but not running:
            # the machine's other processes, not serve's own work.
            "serve_loop_runqueue_wait_s": round(wait1 - wait0, 3),
            "circuit_state_end": total(after, "mirrorgate_shadow_circuit_state"),
            "deltas": _deltas(before, after),
            "load_average": os.getloadavg()[0],
            **({"diagnosis": _diagnosis(tmp, wall0, wall1, rows)} if diagnose else {}),
        }

    async def world(name: str) -> None:
        """Bring the candidate, champion and database into the state of phase ``name``
        from whatever state the previous phase left (so phases can be picked and
        repeated: ``--phases``, ``--cycles``)."""
        nonlocal lock
        if name != "database locked" and lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
            lock = None
        if name != "champion hung":
            champion.upstream.set_fault("normal")
        if name == "candidate refused":
            await candidate.stop()
        elif candidate.runner is None:
            candidate.upstream.set_fault("normal")
            await candidate.start()
        if name in CANDIDATE_FAULTS:
            candidate.upstream.set_fault(CANDIDATE_FAULTS[name])
        elif name != "candidate refused":
            candidate.upstream.set_fault("normal")
        if name == "database locked":
            lock = sqlite3.connect(db_path, timeout=0, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # the writer cannot commit: the database is "down"
        elif name == "database deleted":
            db_path.unlink(missing_ok=True)
        elif name == "champion hung":
            champion.upstream.set_fault("hang")
        if name in ("baseline", "candidate back"):
            # A healthy candidate, mirrored again: wait (load running, not reported) for
            # the circuit to close. After the candidate faults its open period has grown
            # to mirror.circuit.max_open_s (60 s): without this wait "candidate back" was
            # a whole phase of open circuit (no call, no pair) and the recovery fell into
            # the next phase.
            waited = time.perf_counter()
            while total(await metrics(base), "mirrorgate_shadow_circuit_state") != 0:
                if time.perf_counter() - waited > 120:
                    raise AssertionError(f"{name}: the circuit did not close in 120 s")
                await asyncio.sleep(0.5)
            circuit_wait[name] = time.perf_counter() - waited

    try:
        if warmup_s > 0:
            # Not reported: the first seconds carry connection set-up and first-use costs
            # (and any start-up burst on a shared machine), which no fault phase has.
            await asyncio.sleep(warmup_s)
        for cycle in range(cycles):
            for name in selected:
                await world(name)
                phases.append(await phase(name, cycle))
                if diagnose:
                    # What a full GC pass costs serve now; outside every phase's window.
                    phases[-1]["serve_full_gc"] = await _forced_full_gc(proc.pid, tmp)
                print(json.dumps(phases[-1]), flush=True)
        if lock is not None:  # the recorder must be able to settle before the accounting
            lock.execute("ROLLBACK")
            lock.close()
            lock = None
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
        if not sigterm:
            return {"phases": phases, "accounting": accounting}
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


async def _start_diagnosed(
    config: dict[str, Any], tmp: Path, log: Path, gc_freeze: bool = True
) -> tuple[asyncio.subprocess.Process, str]:
    """``serve`` through benchmarks/_lag_serve.py: event-loop lag and GC pauses logged
    to ``tmp/<pid>.lag`` (read per phase by ``_diagnosis``)."""
    path = tmp / "mirrorgate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env["FAULT_DIAG_DIR"] = str(tmp)
    if not gc_freeze:
        env["FAULT_NO_GC_FREEZE"] = "1"
    with log_file(log) as err:  # the child keeps its own descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "benchmarks" / "_lag_serve.py"),
            "serve",
            "--config",
            str(path),
            "--port",
            "0",
            cwd=tmp,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("mirrorgate: listening on "):
        raise AssertionError(f"serve did not start: {line!r}\n{await stop(proc, log)}")
    return proc, line.split()[-1]


def _diagnosis(
    tmp: Path, t0: float, t1: float, rows: list[tuple[float, int, float]]
) -> dict[str, Any]:
    """Event-loop lag and GC pauses of every diagnosed process within [t0, t1), and how
    many of the phase's slowest 1% of requests were in flight during a full (generation
    2) collection or a loop stall over 20 ms (wall-clock windows; both processes read
    the same clock)."""
    offset = time.time() - time.perf_counter()  # request times are perf_counter
    spans = [(start + offset, start + offset + lat) for start, status, lat in rows if status == 200]
    spans.sort(key=lambda s: s[0] - s[1])  # slowest first
    slowest = spans[: max(1, len(spans) // 100)]
    out: dict[str, Any] = {}
    for path in sorted(tmp.glob("*.lag")):
        lags: list[tuple[float, float]] = []
        gcs: dict[str, list[tuple[float, float]]] = {"1": [], "2": []}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or not t0 <= float(parts[1]) < t1:
                continue
            if parts[0] == "lag":
                lags.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "gc" and parts[2] in gcs:
                gcs[parts[2]].append((float(parts[1]), float(parts[3])))
        # A lag line is written when the loop wakes: it was stuck for the ms before.
        gc2_windows = [(t - ms / 1000, t) for t, ms in gcs["2"]]
        stall_windows = [(t - ms / 1000 - 0.005, t) for t, ms in lags if ms > 20]

        def hit(span: tuple[float, float], windows: list[tuple[float, float]]) -> bool:
            return any(a < span[1] and span[0] < b for a, b in windows)

        out[path.stem] = {
            "lag_over_5ms": sum(1 for _, x in lags if x > 5),
            "lag_over_20ms": len(stall_windows),
            "lag_max_ms": max((x for _, x in lags), default=0.0),
            "lag_sum_ms": round(sum(x for _, x in lags), 1),
            "gc1_count": len(gcs["1"]),
            "gc1_ms": round(sum(x for _, x in gcs["1"]), 1),
            "gc2_count": len(gcs["2"]),
            "gc2_ms": round(sum(x for _, x in gcs["2"]), 1),
            "gc2_max_ms": max((x for _, x in gcs["2"]), default=0.0),
            "slowest_1pct": len(slowest),
            "slowest_in_gc2": sum(1 for s in slowest if hit(s, gc2_windows)),
            "slowest_in_stall": sum(1 for s in slowest if hit(s, stall_windows)),
        }
    return out


async def _forced_full_gc(pid: int, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{pid}.lag"
    before = path.read_text().count("fullgc ")
    os.kill(pid, signal.SIGUSR2)
    for _ in range(250):
        await asyncio.sleep(0.02)
        lines = [line for line in path.read_text().splitlines() if line.startswith("fullgc ")]
        if len(lines) > before:
            parts = lines[-1].split()
            await asyncio.sleep(0.5)  # let the requests it held finish before the next phase
            return {
                "ms": float(parts[2]),
                "objects": float(parts[3]),
                "commonest": parts[4] if len(parts) > 4 else "",
            }
    return {}


async def _settled(proc: asyncio.subprocess.Process, base: str, log: Path) -> bool:
    if proc.returncode is not None:
        raise AssertionError(f"serve exited ({proc.returncode}) before accounting:\n{tail(log)}")
    m = await metrics(base)
    return (
        total(m, "mirrorgate_shadow_in_flight") == 0
        and total(m, "mirrorgate_shadow_queue_depth") == 0
        and total(m, "mirrorgate_recorder_buffer_depth") == 0
    )


def _run(
    rate: float,
    phase_s: float,
    shadow_process: bool,
    warmup_s: float,
    selected: tuple[str, ...] = PHASES,
    cycles: int = 1,
    diagnose: bool = False,
    gc_freeze: bool = True,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    report = asyncio.run(
        main(rate, phase_s, shadow_process, warmup_s, selected, cycles, diagnose, gc_freeze)
    )
    report["gc_freeze"] = gc_freeze
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    report["rate"] = rate
    report["shadow_process"] = shadow_process
    base = p50 = float("nan")
    for p in report["phases"]:
        if p["phase"] == "baseline":  # each cycle against its own baseline
            base, p50 = p["p99_ms"], p["p50_ms"]
        p["p99_vs_baseline"] = p["p99_ms"] / base if base else float("nan")
        p["p50_vs_baseline"] = p["p50_ms"] / p50 if p50 else float("nan")
    return report


def _table(report: dict[str, Any]) -> None:
    print("shadow.process:", report["shadow_process"])
    head = ("phase", "n", "fail", "p50 ms", "p99 ms", "p50/b", "p99/b", "cpu", "calls", "circ")
    print("{:22s} {:>5s} {:>5s} {:>7s} {:>7s} {:>6s} {:>6s} {:>6s} {:>6s} {:>4s}".format(*head))
    for p in report["phases"]:
        d = p.get("deltas", {})
        print(
            f"{p['phase']:22s} {p['requests']:5d} {p['live_failures']:5d} "
            f"{p['p50_ms']:7.2f} {p['p99_ms']:7.2f} {p['p50_vs_baseline']:6.2f} "
            f"{p['p99_vs_baseline']:6.2f} {p.get('serve_cpu_ms_per_request', float('nan')):6.2f} "
            f"{d.get('candidate_calls', float('nan')):6.0f} "
            f"{p.get('circuit_state_end', float('nan')):4.0f}"
        )
    print("cpu: serve CPU ms per request sent; calls: candidate calls; circ: circuit state")
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
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated phases to run, in this order (default: all, matrix order)",
    )
    parser.add_argument(
        "--cycles", type=int, default=1, help="run the --phases sequence this many times"
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="log serve's event-loop lag and GC pauses per phase (benchmarks/_lag_serve.py)",
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="with --diagnose: serve without proxy/core/heap.py's freeze (the A/B)",
    )
    args = parser.parse_args()
    if args.no_gc_freeze and not args.diagnose:
        parser.error("--no-gc-freeze needs --diagnose (it works through benchmarks/_lag_serve.py)")
    chosen = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    if chosen[0] != "baseline":
        parser.error("--phases must start with baseline (the reference p99)")
    if args.cycles > 1 and "database deleted" in chosen:
        parser.error("'database deleted' cannot repeat: the proxy does not reopen the file")
    modes = [False, True] if args.both else [args.shadow_process]
    reports = [
        _run(
            args.rate,
            args.phase_s,
            m,
            args.warmup_s,
            chosen,
            args.cycles,
            args.diagnose,
            not args.no_gc_freeze,
        )
        for m in modes
    ]
    if args.json:
        print(json.dumps(reports if args.both else reports[0], indent=2))
    else:
        for report in reports:
            _table(report)
        if args.both:
            _side_by_side(*reports)
