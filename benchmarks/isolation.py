"""Isolation: the champion's latency through the proxy with a healthy vs a 10x slower candidate.

Starts, as separate processes on loopback: a champion V2 upstream, a healthy candidate
upstream, a slow candidate upstream (``--mode slow``: it sleeps 10x the champion's
measured p50 before answering), and two ``mirrorgate serve`` proxies with the same
champion, one mirroring to each candidate (shadow mode, every request mirrored, storage
on a throwaway SQLite file). It drives both proxies side by side in interleaved rounds
(drift on a shared machine hits both alike) and prints the live p50/p99 through each and
their ratio (slow / healthy): the live path never waits on the candidate, so the ratio
should stay near 1. What the slow candidate costs is counted, not hidden: mirrored calls
in flight, dropped past ``mirror.max_in_flight``/``queue_size``.

    python benchmarks/isolation.py [--rounds 5] [--requests 300] [--concurrency 1 8]

Indicative numbers on a shared machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proxy_overhead import (  # noqa: E402
    _all,
    _bodies,
    _drive,
    _pct,
    _proxy_config,
    _spawn,
    _spawn_serve,
    _wait_ready,
)

from proxy.protocol.codec import HEADER_LENGTH  # noqa: E402

SLOWDOWN = 10.0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[asyncio.subprocess.Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-isolation-"))
    up = ["-m", "tests.proxy.upstream", "--features", str(args.features), "--classes", "4"]
    try:
        champ_proc, champion = await _spawn(*up, "--seed", "1")
        procs.append(champ_proc)
        bodies = [(b, {HEADER_LENGTH: hl}) for b, hl in _bodies(args.requests, args.features)]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _wait_ready(session, champion)
            direct = f"{champion}/v2/models/model/infer"
            await _drive(session, direct, bodies[:50], 1)
            measured, _ = await _drive(session, direct, bodies, 1)
            champion_p50_ms = _pct(measured, 50)
            delay_s = max(SLOWDOWN * champion_p50_ms / 1000.0, 0.005)
            healthy_proc, healthy = await _spawn(*up, "--seed", "2")
            slow_proc, slow = await _spawn(
                *up, "--seed", "2", "--mode", "slow", "--delay-s", f"{delay_s:.4f}"
            )
            procs += [healthy_proc, slow_proc]
            targets: dict[str, str] = {}
            for name, candidate in (("healthy candidate", healthy), ("10x slower candidate", slow)):
                config = _proxy_config(
                    champion, candidate, f"sqlite:///{tmp / f'{len(targets)}.sqlite'}"
                )
                config["mirror"].update(
                    max_in_flight=args.max_in_flight, queue_size=args.queue_size
                )
                path = tmp / f"{len(targets)}.yaml"
                path.write_text(yaml.safe_dump(config))
                proc, base = await _spawn_serve(path)
                procs.append(proc)
                targets[name] = base
            for base in targets.values():
                await _wait_ready(session, base)
            results: dict[str, Any] = {}
            for concurrency in args.concurrency:
                lat: dict[str, list[float]] = {t: [] for t in targets}
                for base in targets.values():  # warm-up
                    await _drive(session, f"{base}/v2/models/model/infer", bodies[:50], concurrency)
                for _ in range(args.rounds):
                    for name, base in targets.items():
                        got, _ = await _drive(
                            session, f"{base}/v2/models/model/infer", bodies, concurrency
                        )
                        lat[name] += got
                rows = {
                    name: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99), "n": len(v)}
                    for name, v in lat.items()
                }
                h, s = rows["healthy candidate"], rows["10x slower candidate"]
                rows["ratio slow/healthy"] = {
                    "p50": s["p50_ms"] / h["p50_ms"],
                    "p99": s["p99_ms"] / h["p99_ms"],
                }
                results[f"concurrency {concurrency}"] = rows
            counters = {}
            for name, base in targets.items():
                async with session.get(f"{base}/metrics") as resp:
                    text = await resp.text()
                counters[name] = {
                    "shadow_dropped": sum(_all(text, "mirrorgate_shadow_dropped_total")),
                    "shadow_failures": sum(_all(text, "mirrorgate_shadow_failures_total")),
                }
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            "load": os.getloadavg()[0],
            "champion_direct_p50_ms": champion_p50_ms,
            "candidate_delay_ms": delay_s * 1000,
            "mirror": {"max_in_flight": args.max_in_flight, "queue_size": args.queue_size},
            "results": results,
            "counters": counters,
        }
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"machine: {report['machine']}, 1-min load {report['load']:.2f}; champion direct p50 "
        f"{report['champion_direct_p50_ms']:.2f} ms, slow candidate sleeps "
        f"{report['candidate_delay_ms']:.1f} ms",
    ]
    for section, rows in report["results"].items():
        lines += [
            "",
            f"**{section}**",
            "",
            "| proxy | p50 ms | p99 ms | n |",
            "|---|---:|---:|---:|",
        ]
        for name, row in rows.items():
            if name.startswith("ratio"):
                continue
            lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['n']} |")
        ratio = rows["ratio slow/healthy"]
        lines.append(f"| ratio slow/healthy | {ratio['p50']:.2f} | {ratio['p99']:.2f} | |")
    lines += ["", "counters: " + json.dumps(report["counters"])]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    args = parser.parse_args()
    report = asyncio.run(main(args))
    print(json.dumps(report, indent=2) if args.json else _markdown(report))
