"""The latencies the latency gates compare, with the shadow worker niced or not, on a
saturated host: what a deprioritised worker's timing does to the candidate's numbers.

Starts, as processes on loopback, two V2 test upstreams computing the same model (same
seed: the candidate is exactly as fast as the champion, so any gap the pairs show is the
measurement's) and ``mirrorgate serve`` with the shadow work in a worker process
(``shadow.process: true``), once per (checkout, ``shadow.worker_nice``), every serve
recording its pairs (``--pairs-out``). ``--hogs`` busy-loop processes at nice 0 keep
every core busy for the whole run (what a loaded host looks like to the scheduler).
Targets are driven in interleaved rounds at concurrency ``--concurrency``; then each
serve's dropped pairs are read from its ``/metrics``, it is stopped (it flushes its
pairs) and the recorded ``champion.latency_ms`` /
``candidate.latency_ms`` are summarised: p50 and p99 of each side, and the median of the
per-pair difference (candidate minus champion), which the gates would read as the
candidate being slower.

    python benchmarks/candidate_latency.py [--rounds 2] [--requests 150] [--hogs 3]
        [--concurrency 4] [--nice 0,10] [--upstream-nice -10] [--max-in-flight 64]
        [--placements default,pinned] [--root LABEL=DIR ...]

``--placements pinned`` adds each row again with the live process on CPU 0 and the worker
on CPU 1 (``server.cpus``, ``shadow.worker_cpus``).

``--root LABEL=DIR`` adds a checkout (``DIR`` holds its ``proxy``, ``gates`` and
``storage`` packages), e.g. the tree before the kernel-timestamp timing as
``old=/path``; this tree is always ``this tree``. Numbers from one loaded machine are
indicative; the output states the load average. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proxy_overhead import _bodies, _drive, _proxy_config, _spawn, _spawn_serve, _wait_ready  # noqa: E402

from proxy.protocol.codec import HEADER_LENGTH  # noqa: E402

HOG = "while True: pass"


async def _dropped(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Pairs the serve dropped, by reason (``mirrorgate_shadow_dropped_total``)."""
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mirrorgate_shadow_dropped_total"):
            match = re.search(r'reason="([^"]*)"', line)
            reason = match.group(1) if match else "?"
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return {k: v for k, v in out.items() if v}


def _summary(path: Path) -> dict[str, Any]:
    champion, candidate = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        ch, ca = record["champion"].get("latency_ms"), record["candidate"].get("latency_ms")
        if ch is not None and ca is not None:
            champion.append(ch)
            candidate.append(ca)
    if not champion:
        return {"pairs": 0}
    ch_a, ca_a = np.asarray(champion), np.asarray(candidate)
    return {
        "pairs": len(champion),
        "champion_p50_ms": float(np.percentile(ch_a, 50)),
        "champion_p99_ms": float(np.percentile(ch_a, 99)),
        "candidate_p50_ms": float(np.percentile(ca_a, 50)),
        "candidate_p99_ms": float(np.percentile(ca_a, 99)),
        "median_gap_ms": float(np.median(ca_a - ch_a)),
        "p50_ratio": float(np.percentile(ca_a, 50) / np.percentile(ch_a, 50)),
        "p99_ratio": float(np.percentile(ca_a, 99) / np.percentile(ch_a, 99)),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[asyncio.subprocess.Process] = []
    hogs: list[asyncio.subprocess.Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-candlat-"))
    roots = {"this tree": ROOT}
    for spec in args.root:
        label, _, where = spec.partition("=")
        roots[label] = Path(where)
    nices = [int(n) for n in args.nice.split(",")]
    load_start = os.getloadavg()
    try:
        up = ["-m", "tests.proxy.upstream", "--features", str(args.features), "--classes", "4"]
        champ_proc, champion = await _spawn(*up, "--seed", "1")
        cand_proc, candidate = await _spawn(*up, "--seed", "1")
        procs += [champ_proc, cand_proc]
        if args.upstream_nice:
            # Upstreams on machines of their own, as in production: ahead of the hogs, so
            # what the pairs show is the proxy's measurement, not two upstreams starved.
            # (Threads the upstream starts later inherit its main thread's priority.)
            for proc in (champ_proc, cand_proc):
                os.setpriority(os.PRIO_PROCESS, proc.pid, args.upstream_nice)
        targets: dict[str, tuple[str, Path, asyncio.subprocess.Process]] = {}
        rows = [
            (label, root, nice, placement)
            for label, root in roots.items()
            for nice in nices
            for placement in args.placements.split(",")
        ]
        for label, root, nice, placement in rows:
            name = f"{label}, worker_nice {nice}"
            n = len(targets)
            config = _proxy_config(
                champion, candidate, f"sqlite:///{tmp / f'{n}.sqlite'}", process=True
            )
            config["shadow"]["worker_nice"] = nice
            if placement == "pinned":  # the live process on CPU 0, the worker on 1
                name += ", pinned"
                config["server"]["cpus"] = [0]
                config["shadow"]["worker_cpus"] = [1]
            config["mirror"]["max_in_flight"] = args.max_in_flight
            path = tmp / f"{n}.yaml"
            path.write_text(yaml.safe_dump(config))
            pairs = tmp / f"{n}.jsonl"
            proc, base = await _spawn_serve(path, "--pairs-out", str(pairs), root=root)
            procs.append(proc)
            targets[name] = (base, pairs, proc)
        bodies = [(b, {HEADER_LENGTH: hl}) for b, hl in _bodies(args.requests, args.features)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for base, _, _ in targets.values():
                await _wait_ready(session, base)
            for _ in range(args.hogs):  # the load: every core busy, at nice 0
                hogs.append(await asyncio.create_subprocess_exec(sys.executable, "-c", HOG))
            load_during = []
            for _ in range(args.rounds):
                for base, _, _ in targets.values():
                    url = f"{base}/v2/models/model/infer"
                    await _drive(session, url, bodies, args.concurrency)
                load_during.append(os.getloadavg()[0])
        for hog in hogs:
            hog.kill()
            await hog.wait()
        hogs = []
        # every mirrored call must be in before the serves stop (they flush on SIGTERM)
        await asyncio.sleep(3)
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            dropped = {name: await _dropped(session, base) for name, (base, *_) in targets.items()}
        for name, (_, pairs, proc) in targets.items():
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
            results[name] = {**_summary(pairs), "dropped": dropped[name]}
        return {
            "load_average_start": load_start,
            "load_average_1m_during": load_during,
            "cpus": os.cpu_count(),
            "hogs": args.hogs,
            "concurrency": args.concurrency,
            "upstream_nice": args.upstream_nice,
            "max_in_flight": args.max_in_flight,
            "requests_per_target": args.requests * args.rounds,
            "results": results,
        }
    finally:
        for proc in hogs + procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _print(report: dict[str, Any]) -> None:
    print(
        f"cpus {report['cpus']}, {report['hogs']} busy-loop hogs, c={report['concurrency']}, "
        f"{report['requests_per_target']} requests per target, upstreams at nice "
        f"{report['upstream_nice']}, mirror.max_in_flight {report['max_in_flight']}; "
        "load average at start "
        f"{report['load_average_start']}, 1m during {report['load_average_1m_during']}"
    )
    head = (
        f"{'target':<38}{'pairs':>6}{'drop':>5}{'champ p50':>10}{'champ p99':>10}"
        f"{'cand p50':>10}{'cand p99':>10}{'med gap':>9}{'p50 x':>7}{'p99 x':>7}"
    )
    print(head)
    for name, r in report["results"].items():
        if not r.get("pairs"):
            print(f"{name:<38}{0:>6}{sum(r['dropped'].values()):>5.0f} {r['dropped']}")
            continue
        print(
            f"{name:<38}{r['pairs']:>6}{sum(r['dropped'].values()):>5.0f}"
            f"{r['champion_p50_ms']:>10.2f}{r['champion_p99_ms']:>10.2f}"
            f"{r['candidate_p50_ms']:>10.2f}{r['candidate_p99_ms']:>10.2f}"
            f"{r['median_gap_ms']:>9.2f}{r['p50_ratio']:>7.2f}{r['p99_ratio']:>7.2f}"
            + (f"  dropped: {r['dropped']}" if r["dropped"] else "")
        )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=150, help="per target per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--hogs", type=int, default=3, help="busy-loop processes (the load)")
    parser.add_argument("--nice", default="0,10", help="shadow.worker_nice values")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument(
        "--max-in-flight", type=int, default=64, help="mirror.max_in_flight of every serve"
    )
    parser.add_argument(
        "--upstream-nice",
        type=int,
        default=0,
        help="the upstreams' nice value (negative, as root: upstreams ahead of the load)",
    )
    parser.add_argument(
        "--placements",
        default="default",
        help="default and/or pinned (server.cpus [0], shadow.worker_cpus [1]), comma-separated",
    )
    parser.add_argument("--root", action="append", default=[], help="LABEL=DIR, repeatable")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    report = asyncio.run(main(args))
    report["wall_s"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
        print(f"wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    cli()
