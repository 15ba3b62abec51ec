"""CPU the shadow worker process spends per mirrored pair (issue 11, worker side).

Starts, as separate processes on loopback: the V2 test upstream (``softmax(x @ W)``,
tests/proxy/upstream.py) as champion and one as candidate, and ``mirrorgate serve`` with
both remote (``kind: http``), shadow mode, ``shadow.process: true`` (the live process
hands each pair to the shadow worker process), storage on (a throwaway SQLite file,
inputs captured per the default policy) and gates on. ``--baseline DIR`` (repeatable) starts
one more ``serve`` running the code of another checkout (``DIR`` holds its ``proxy``
package) on the same upstreams: before and after in one run, phases interleaved.

Three phases per round, for each target in turn:

* **serial**: one request at a time (concurrency 1, closed loop), ``--serial-requests``
  of them: the live path's c=1 case, where every per-pair cost the worker has (a loop
  wake-up, a timer, a commit) is paid once per pair, with nothing to batch it with;
* **rate**: ``--rate`` requests per second, open loop (each sent at its planned time,
  whatever the previous ones do), ``--rate-requests`` of them;
* **saturation**: ``--concurrency`` requests at a time, closed loop, as fast as the
  proxy answers, ``--saturation-requests`` of them.

For each phase: the worker's user+system CPU seconds (``/proc/<pid>/stat`` of the worker
process alone, its threads included: the recorder writer and the gates' thread) and the
live process's, read when the previous phase's pairs are all accounted for and again
when this phase's are (pairs written by the recorder + shadow drops == requests sent,
polled on ``/metrics``), divided by the pairs written in the phase. Pairs written and
dropped are reported with the requests sent: no drop may buy the number.

    python benchmarks/worker_cost.py [--rounds 2] [--baseline /path/to/other/checkout]

Numbers from a loaded 2-core machine are indicative; the output states the load
average. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proxy_overhead import _all, _bodies, _metric, _spawn, _spawn_serve, _wait_ready  # noqa: E402

from proxy.protocol.codec import HEADER_LENGTH  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _config(
    champion: str, candidate: str, storage_url: str, event_loop: str = "asyncio"
) -> dict[str, Any]:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 10000}

    return {
        "server": {
            "host": "127.0.0.1",
            "model_name": "model",
            "shutdown_timeout_s": 5,
            "event_loop": event_loop,
        },
        "models": {"champion": model("champion", champion), "candidate": model("c", candidate)},
        "mirror": {
            "mode": "shadow",
            "max_in_flight": 64,
            "queue_size": 4096,
            # the two upstreams differ, so the gates abort early: keep mirroring anyway
            # (this measures the cost of shadow work, not of a stopped candidate)
            "shadow_after_abort": True,
        },
        "shadow": {"process": True},
        "storage": {"url": storage_url},
    }


def _cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _worker_pid(serve_pid: int) -> int:
    """The shadow worker: the spawned child of ``serve`` (not the resource tracker)."""
    for child in _children(serve_pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return child
    raise RuntimeError(f"serve {serve_pid} has no shadow worker process")


async def _accounted(
    session: aiohttp.ClientSession, base: str, sent: int, deadline_s: float = 120.0
) -> tuple[float, float]:
    """Wait until pairs written + shadow drops == ``sent``; (written, dropped)."""
    end = time.monotonic() + deadline_s
    while True:
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
        written = _metric(text, "mirrorgate_recorder_written_total")
        dropped = sum(_all(text, "mirrorgate_shadow_dropped_total")) + sum(
            _all(text, "mirrorgate_recorder_dropped_total")
        )
        if written + dropped >= sent or time.monotonic() > end:
            return written, dropped
        await asyncio.sleep(0.05)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, hl: str) -> None:
    async with session.post(url, data=body, headers={HEADER_LENGTH: hl}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")


async def _rate(
    session: aiohttp.ClientSession, url: str, bodies: list[tuple[bytes, str]], rate: float
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, (body, hl) in enumerate(bodies):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(_post(session, url, body, hl)))
    await asyncio.gather(*tasks)


async def _saturate(
    session: aiohttp.ClientSession, url: str, bodies: list[tuple[bytes, str]], concurrency: int
) -> None:
    todo = list(reversed(bodies))

    async def one() -> None:
        while todo:
            body, hl = todo.pop()
            await _post(session, url, body, hl)

    await asyncio.gather(*(one() for _ in range(concurrency)))


class Target:
    def __init__(self, name: str, base: str, serve_pid: int) -> None:
        self.name = name
        self.base = base
        self.serve_pid = serve_pid
        self.worker_pid = _worker_pid(serve_pid)
        self.sent = 0
        self.idle_ms_per_s = 0.0
        self.phases: dict[str, dict[str, float]] = {}

    def add(self, phase: str, **values: float) -> None:
        row = self.phases.setdefault(phase, dict.fromkeys(values, 0.0))
        for key, value in values.items():
            row[key] += value


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[asyncio.subprocess.Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-worker-cost-"))
    load_start = os.getloadavg()
    try:
        up = ["-m", "tests.proxy.upstream", "--features", str(args.features), "--classes", "4"]
        champ_proc, champion = await _spawn(*up, "--seed", "1")
        cand_proc, candidate = await _spawn(*up, "--seed", "2")
        procs += [champ_proc, cand_proc]
        roots = [("this tree", ROOT, "asyncio")]
        if args.uvloop:
            roots.append(("this tree, uvloop", ROOT, "uvloop"))
        for base in args.baseline or ():
            roots.append((f"baseline {base.name}", base.resolve(), "asyncio"))
        targets: list[Target] = []
        for name, root, loop in roots:
            path = tmp / f"{len(targets)}.yaml"
            db = f"sqlite:///{tmp / f'{len(targets)}.sqlite'}"
            path.write_text(yaml.safe_dump(_config(champion, candidate, db, loop)))
            proc, base = await _spawn_serve(path, root=root)
            procs.append(proc)
            targets.append(Target(name, base, proc.pid))
        n = max(args.rate_requests, args.saturation_requests, args.serial_requests)
        bodies = _bodies(n, args.features)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for t in targets:
                await _wait_ready(session, t.base)
                url = f"{t.base}/v2/models/model/infer"
                warm = bodies[:100]  # fewer when every phase is shorter than that
                await _saturate(session, url, warm, 8)  # warm-up: connections
                t.sent += len(warm)
                await _accounted(session, t.base, t.sent)
            phases = (
                ("serial", args.serial_requests, lambda s, u, b: _saturate(s, u, b, 1)),
                ("rate", args.rate_requests, lambda s, u, b: _rate(s, u, b, args.rate)),
                (
                    "saturation",
                    args.saturation_requests,
                    lambda s, u, b: _saturate(s, u, b, args.concurrency),
                ),
            )
            # the workers' own timers (gates' tick, flushes), no traffic: every target
            # over the same window, after the warm-ups' work settled
            await asyncio.sleep(2.0)
            idle0 = [_cpu(t.worker_pid) for t in targets]
            await asyncio.sleep(args.idle_s)
            for t, cpu0 in zip(targets, idle0, strict=True):
                t.idle_ms_per_s = 1000.0 * (_cpu(t.worker_pid) - cpu0) / args.idle_s
            for _ in range(args.rounds):
                for phase, count, drive in phases:
                    for t in targets:
                        url = f"{t.base}/v2/models/model/infer"
                        w0, d0 = await _accounted(session, t.base, t.sent)
                        cpu0, live0 = _cpu(t.worker_pid), _cpu(t.serve_pid)
                        start = time.perf_counter()
                        await drive(session, url, bodies[:count])
                        answered = time.perf_counter() - start
                        t.sent += count
                        w1, d1 = await _accounted(session, t.base, t.sent)
                        done = time.perf_counter() - start
                        cpu1, live1 = _cpu(t.worker_pid), _cpu(t.serve_pid)
                        t.add(
                            phase,
                            sent=count,
                            written=w1 - w0,
                            dropped=d1 - d0,
                            worker_cpu_s=cpu1 - cpu0,
                            live_cpu_s=live1 - live0,
                            answered_s=answered,
                            accounted_s=done,
                        )
        report: dict[str, Any] = {
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
            ),
            "load_before": load_start,
            "load_after": os.getloadavg(),
            "rate": args.rate,
            "concurrency": args.concurrency,
            "targets": {},
        }
        for t in targets:
            rows = {}
            for phase, v in t.phases.items():
                written = max(v["written"], 1.0)
                rows[phase] = {
                    **v,
                    "worker_ms_per_pair": 1000.0 * v["worker_cpu_s"] / written,
                    "live_ms_per_pair": 1000.0 * v["live_cpu_s"] / written,
                    "pairs_per_s": v["written"] / v["accounted_s"],
                }
            report["targets"][t.name] = rows
            report.setdefault("idle_ms_per_s", {})[t.name] = t.idle_ms_per_s
        return report
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


def _markdown(report: dict[str, Any]) -> str:
    lb, la = report["load_before"], report["load_after"]
    out = [
        f"Machine: {report['machine']}; load average (1/5/15 min) before "
        f"{lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f}, after {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}.",
        "",
        "| target | phase | sent | written | dropped | worker CPU ms/pair "
        "| live CPU ms/pair | pairs/s (to written) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "serial": "serial c=1",
        "rate": f"rate {report['rate']:g}/s",
        "saturation": f"saturation c={report['concurrency']}",
    }
    for name, rows in report["targets"].items():
        for phase, r in rows.items():
            out.append(
                f"| {name} | {labels[phase]} | {r['sent']:.0f} | {r['written']:.0f} "
                f"| {r['dropped']:.0f} | {r['worker_ms_per_pair']:.3f} "
                f"| {r['live_ms_per_pair']:.3f} | {r['pairs_per_s']:.0f} |"
            )
    out.append("")
    for name, idle in report["idle_ms_per_s"].items():
        out.append(f"- {name}: worker CPU with no traffic {idle:.1f} ms per second")
    names = list(report["targets"])
    if len(names) > 1:
        out.append("")
    for other in names[1:]:
        for phase in report["targets"][names[0]]:
            mine = report["targets"][names[0]][phase]["worker_ms_per_pair"]
            base = report["targets"][other][phase]["worker_ms_per_pair"]
            out.append(
                f"- {labels[phase]}: worker CPU per pair, this tree / {other}: {mine / base:.2f}"
            )
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--serial-requests", type=int, default=400, help="serial phase (concurrency 1)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="rate phase: requests/s")
    parser.add_argument("--rate-requests", type=int, default=500)
    parser.add_argument("--saturation-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle CPU measured over")
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        help="another checkout (e.g. main; repeatable): one more serve with its code, "
        "phases interleaved with this tree's, for a before/after from one run",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="one more serve of this tree with server.event_loop: uvloop (if installed)",
    )
    ns = parser.parse_args()
    result = asyncio.run(main(ns))
    print(json.dumps(result, indent=2) if ns.json else _markdown(result))
