"""Live-path overhead of the proxy: upstream called directly vs through mirrorgate.

Starts, as separate processes on loopback: two V2 upstreams (the test upstream server,
``softmax(x @ W)``: champion and candidate), a proxy with no candidate (shadow off) and a
proxy with the candidate mirrored (shadow on). Then it drives the three targets side by
side in interleaved rounds (so drift of a shared machine hits all three alike) with the
tritonclient default encoding (binary tensors), and prints p50/p99 latency, requests/s and
the latency the proxy adds over the direct call.

    python benchmarks/proxy_overhead.py [--rounds 5] [--requests 300] [--concurrency 1 8]

Measured in one process on a shared machine, the numbers are indicative; the table says
which CPU count it ran on. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
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

from proxy.codec import HEADER_LENGTH, encode_infer_request  # noqa: E402


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"{args}: no listening line, got {line!r}")
    return proc, match.group(1)


async def _wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(600):
        try:
            async with session.get(f"{base}/v2/health/ready") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{base} never became ready")


def _proxy_config(
    champion: str, candidate: str | None, features: int, storage_url: str | None = None
) -> dict[str, Any]:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 10000}

    models = {"champion": model("champion", champion)}
    if candidate:
        models["candidate"] = model("candidate", candidate)
    return {
        "server": {"host": "127.0.0.1", "model_name": "model", "shutdown_timeout_s": 5},
        "models": models,
        "mirror": {
            "mode": "shadow",
            "max_in_flight": 64,
            "queue_size": 4096,
            # the two upstreams differ, so the gates abort early: keep mirroring anyway,
            # this measures the cost of shadow work, not of a stopped candidate
            "shadow_after_abort": True,
        },
        # serve records pairs to storage: a throwaway SQLite file, never the source tree
        "storage": {"capture": "never", **({"url": storage_url} if storage_url else {})},
    }


async def _drive(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[tuple[bytes, dict[str, str]]],
    concurrency: int,
) -> tuple[list[float], float]:
    """Send every body (``concurrency`` at a time); latencies (s) and wall time (s)."""
    latencies: list[float] = []
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            body, headers = queue.pop()
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[asyncio.subprocess.Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-bench-"))
    try:
        up = ["-m", "tests.proxy.upstream", "--features", str(args.features), "--classes", "4"]
        champ_proc, champion = await _spawn(*up, "--seed", "1")
        cand_proc, candidate = await _spawn(*up, "--seed", "2")
        procs += [champ_proc, cand_proc]
        targets = {"direct": f"{champion}/v2/models/model/infer"}
        for name, cand in (("proxy, shadow off", None), ("proxy, shadow on", candidate)):
            path = tmp / f"{len(targets)}.yaml"
            db = f"sqlite:///{tmp / f'{len(targets)}.sqlite'}"
            path.write_text(yaml.safe_dump(_proxy_config(champion, cand, args.features, db)))
            proc, base = await _spawn(
                "-m",
                "proxy",
                "--log-level",
                "WARNING",
                "serve",
                "--config",
                str(path),
                "--port",
                "0",
            )
            procs.append(proc)
            targets[name] = f"{base}/v2/models/model/infer"
        rng = np.random.default_rng(0)
        bodies = []
        for i in range(args.requests):
            x = rng.normal(size=(1, args.features)).astype(np.float32)
            body, hl = encode_infer_request({"x": x}, request_id=f"b{i}")
            bodies.append((body, {HEADER_LENGTH: str(hl)}))
        connector = aiohttp.TCPConnector(limit=0)
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession(connector=connector) as session:
            for base in targets.values():
                await _wait_ready(session, base.split("/v2/")[0])
            for concurrency in args.concurrency:
                lat: dict[str, list[float]] = {t: [] for t in targets}
                wall: dict[str, float] = dict.fromkeys(targets, 0.0)
                for url in targets.values():  # warm-up: connections, caches
                    await _drive(session, url, bodies[:50], concurrency)
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        got, seconds = await _drive(session, url, bodies, concurrency)
                        lat[name] += got
                        wall[name] += seconds
                rows = {}
                for name in targets:
                    rows[name] = {
                        "p50_ms": _pct(lat[name], 50),
                        "p99_ms": _pct(lat[name], 99),
                        "mean_ms": statistics.fmean(lat[name]) * 1000,
                        "req_per_s": len(lat[name]) / wall[name],
                        "n": len(lat[name]),
                    }
                for name in targets:
                    if name != "direct":
                        rows[name]["added_p50_ms"] = rows[name]["p50_ms"] - rows["direct"]["p50_ms"]
                        rows[name]["added_p99_ms"] = rows[name]["p99_ms"] - rows["direct"]["p99_ms"]
                results[f"concurrency {concurrency}"] = rows
            metrics_url = targets["proxy, shadow on"].split("/v2/")[0] + "/metrics"
            async with session.get(metrics_url) as resp:
                text = await resp.text()
        shadow = {
            "candidate_calls_ok": _metric(
                text, 'mirrorgate_proxy_requests_total{code="200",role="candidate"}'
            ),
            "shadow_dropped": sum(_all(text, "mirrorgate_shadow_dropped_total")),
            "shadow_failures": sum(_all(text, "mirrorgate_shadow_failures_total")),
        }
        return {
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
            ),
            "load": os.getloadavg()[0],
            "results": results,
            "shadow_on_counters": shadow,
            "features": args.features,
        }
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _all(text: str, prefix: str) -> list[float]:
    return [float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix + "{")]


def _markdown(report: dict[str, Any]) -> str:
    out = [f"Machine: {report['machine']}; 1-min load average at the end {report['load']:.1f}.", ""]
    for label, rows in report["results"].items():
        out += [
            f"**{label}** ({rows['direct']['n']} requests per target, interleaved rounds)",
            "",
            "| target | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            added50 = f"{r['added_p50_ms']:+.2f}" if "added_p50_ms" in r else ""
            added99 = f"{r['added_p99_ms']:+.2f}" if "added_p99_ms" in r else ""
            out.append(
                f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['req_per_s']:.0f} "
                f"| {added50} | {added99} |"
            )
        out.append("")
    s = report["shadow_on_counters"]
    out.append(
        f"Shadow-on proxy counters: {s['candidate_calls_ok']:.0f} candidate calls OK, "
        f"{s['shadow_dropped']:.0f} dropped, {s['shadow_failures']:.0f} failed."
    )
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="per target per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    ns = parser.parse_args()
    report = asyncio.run(main(ns))
    print(json.dumps(report, indent=2) if ns.json else _markdown(report))
