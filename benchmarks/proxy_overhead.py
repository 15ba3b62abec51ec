"""Live-path overhead of the proxy, side by side with nginx ``mirror`` and a Python floor.

Starts, as separate processes on loopback: the V2 test upstream (``softmax(x @ W)``) as
champion and two candidate upstreams (one for nginx, one for the mirrorgates, so
candidate calls are attributable), a minimal aiohttp pass-through proxy (the Python
floor, benchmarks/passthrough_floor.py), nginx with ``mirror`` to the candidate (when
``nginx`` is installed: Debian's nginx-light), and ``mirrorgate serve`` several ways: no
candidate; shadow in-process (the design before the worker process, on the aiohttp
live path; and on the byte-level live path, side by side with the worker); the default
(``shadow.process: auto``: the shadow work in a worker process for this remote
candidate); the same with two live processes (``server.workers: 2``);
no candidate and the default again on the aiohttp live path (``server.live_path:
aiohttp``, the live path before the byte-level front); and, with ``BENCH_UVLOOP=1``,
the default on uvloop. Every mirrorgate
records pairs to SQLite and runs the gates. Two prototype rows (benchmarks/mirror_floor.py,
measurement only) show the cheapest Python mirror: ``asyncio.Protocol`` forwarding of the
raw bytes, with and without handing each pair to a child process. ``--baseline DIR``
also runs the no-candidate and default shadow rows with the code of another checkout
(``DIR`` holds its ``proxy`` package), marked ``[baseline]``: before and after in one run.
Targets are driven in interleaved rounds (a shared machine's drift hits all alike) with
binary-tensor FP32 [1, F] bodies: p50/p99 at concurrency 1, throughput at 32, the CPU
time each target's own processes spent per request (proxy and its workers; less
sensitive to the neighbours than latency), then the candidate calls made, dropped and
failed by each mirroring target over the whole run.

    python benchmarks/proxy_overhead.py [--rounds 3] [--requests 200] [--throughput-requests 400]
        [--baseline /path/to/other/checkout] [--isolate]

``--isolate`` places every target as production would on 2 cores: CPU 0 runs the client,
the champion and each proxy's live process(es), CPU 1 the candidate upstreams and each
mirror's shadow work (mirrorgate through ``server.cpus`` / ``shadow.worker_cpus``).
Extra rows by environment: ``BENCH_WORKER_NICE=N`` (the default shadow row at
``shadow.worker_nice: N``), ``BENCH_PINNED=1`` (live process on CPU 0, worker on CPU 1,
the rest unplaced), ``BENCH_UNPINNED=1`` with ``--isolate`` (mirrorgate without the
settings in the placed world), ``BENCH_UVLOOP=1``.

Numbers from one loaded machine are indicative; the output states the load average.
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
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

from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request  # noqa: E402


async def _spawn(*args: str, root: Path = ROOT) -> tuple[asyncio.subprocess.Process, str]:
    # cwd and PYTHONPATH pick the checkout whose code runs (``--baseline`` passes another)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=root,
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


async def _spawn_serve(
    config: Path, *extra: str, root: Path = ROOT
) -> tuple[asyncio.subprocess.Process, str]:
    """``mirrorgate serve`` of checkout ``root`` on ``config``, on a free port."""
    return await _spawn(
        "-m",
        "proxy",
        "--log-level",
        "WARNING",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        *extra,
        root=root,
    )


def _bodies(n: int, features: int) -> list[tuple[bytes, str]]:
    """``n`` binary-tensor infer bodies of FP32 [1, features] (fixed seed) and their
    ``Inference-Header-Content-Length`` (a binary body always has one)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = rng.normal(size=(1, features)).astype(np.float32)
        body, hl = encode_infer_request({"x": x}, request_id=f"b{i}")
        assert hl is not None
        out.append((body, str(hl)))
    return out


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
    champion: str,
    candidate: str | None,
    storage_url: str,
    *,
    process: bool | str = "auto",
    event_loop: str = "asyncio",
    workers: int = 1,
) -> dict[str, Any]:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 10000}

    models = {"champion": model("champion", champion)}
    if candidate:
        models["candidate"] = model("candidate", candidate)
    return {
        "server": {
            "host": "127.0.0.1",
            "model_name": "model",
            "shutdown_timeout_s": 5,
            "event_loop": event_loop,
            "workers": workers,
        },
        "models": models,
        "mirror": {
            "mode": "shadow",
            "max_in_flight": 64,
            "queue_size": 4096,
            # the two upstreams differ, so the gates abort early: keep mirroring anyway,
            # this measures the cost of shadow work, not of a stopped candidate
            "shadow_after_abort": True,
        },
        "shadow": {"process": process},
        # storage on (pairs recorded, inputs captured per the default policy) in a
        # throwaway SQLite file; gates on (a candidate is configured)
        "storage": {"url": storage_url},
    }


NGINX_CONF = """
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    client_max_body_size 16m;
    upstream champion {{ server {champion}; keepalive 64; }}
    upstream candidate {{ server {candidate}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location = /v2/health/ready {{ return 200 "ok"; }}
        location / {{
            mirror /_mirror;
            mirror_request_body on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://champion;
        }}
        location = /_mirror {{
            internal;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://candidate$request_uri;
        }}
    }}
}}
"""


def _nginx() -> str | None:
    """Debian's nginx-light (``apt-get install nginx-light``) lives in /usr/sbin."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


MIRRORGATES = {
    # name: (candidate?, shadow.process, server.event_loop, server.workers, server.live_path)
    # live_path None: the default (auto: the byte-level front before a remote champion)
    "mirrorgate, no candidate": (False, "auto", "asyncio", 1, None),
    "mirrorgate, no candidate, aiohttp live path": (False, "auto", "asyncio", 1, "aiohttp"),
    "mirrorgate shadow, in-process (before)": (True, False, "asyncio", 1, "aiohttp"),
    "mirrorgate shadow, in-process, byte-level live path": (True, False, "asyncio", 1, None),
    # the real defaults: shadow.process auto (a worker for a remote candidate), live_path auto
    "mirrorgate shadow, worker process (default)": (True, "auto", "asyncio", 1, None),
    "mirrorgate shadow, worker process, aiohttp live path": (True, True, "asyncio", 1, "aiohttp"),
    "mirrorgate shadow, worker process, 2 live processes": (True, True, "asyncio", 2, None),
}
if os.environ.get("BENCH_UVLOOP"):  # runs A/B of docs/benchmarks.md
    MIRRORGATES["mirrorgate shadow, worker process, uvloop"] = (True, True, "uvloop", 1, None)
# BENCH_WORKER_NICE=N adds the default shadow row with ``shadow.worker_nice: N``
WORKER_NICE = int(os.environ.get("BENCH_WORKER_NICE", "0"))
NICED = f"mirrorgate shadow, worker process, worker_nice {WORKER_NICE}"
if WORKER_NICE:
    MIRRORGATES[NICED] = (True, "auto", "asyncio", 1, None)
# With --isolate, BENCH_UNPINNED=1 adds the default shadow row without server.cpus and
# shadow.worker_cpus (the same world, mirrorgate's processes placed by the scheduler)
UNPINNED = "mirrorgate shadow, worker process, not pinned"
if os.environ.get("BENCH_UNPINNED"):
    MIRRORGATES[UNPINNED] = (True, "auto", "asyncio", 1, None)
# BENCH_PINNED=1 adds the default shadow row with the live process on CPU 0 and the worker
# on CPU 1 (server.cpus, shadow.worker_cpus), everything else placed by the scheduler
PINNED = "mirrorgate shadow, worker process, live on CPU 0, worker on CPU 1"
if os.environ.get("BENCH_PINNED"):
    MIRRORGATES[PINNED] = (True, "auto", "asyncio", 1, None)
SHADOWED = [name for name, (cand, *_) in MIRRORGATES.items() if cand]
# Rows --no-variants leaves out (shorter runs; the targets are judged without them)
VARIANTS = (
    "mirrorgate shadow, in-process (before)",
    "mirrorgate shadow, in-process, byte-level live path",
    "mirrorgate shadow, worker process, 2 live processes",
)
# The rows --baseline DIR repeats with the code of DIR (before/after in one run).
BASELINE_ROWS = ("mirrorgate, no candidate", "mirrorgate shadow, worker process (default)")
BASELINE = " [baseline]"
# benchmarks/mirror_floor.py: the cheapest Python mirror (a measurement, not the product)
PROTOTYPES = {
    "asyncio.Protocol mirror (prototype)": (),
    "asyncio.Protocol mirror + pair hand-off (prototype)": ("--handoff",),
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[asyncio.subprocess.Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-bench-"))
    load_start = os.getloadavg()
    try:
        up = ["-m", "tests.proxy.upstream", "--features", str(args.features), "--classes", "4"]
        champ_proc, champion = await _spawn(*up, "--seed", "1")
        # one candidate upstream for nginx, one for the mirrorgates: calls are attributable
        nginx_cand_proc, nginx_candidate = await _spawn(*up, "--seed", "2")
        cand_proc, candidate = await _spawn(*up, "--seed", "2")
        procs += [champ_proc, nginx_cand_proc, cand_proc]
        targets = {"direct": champion}
        # the process (tree) behind each target, for its CPU time per request
        pids = {"direct": champ_proc.pid}
        floor_proc, floor = await _spawn(
            str(ROOT / "benchmarks" / "passthrough_floor.py"), "--upstream", champion
        )
        procs.append(floor_proc)
        targets["aiohttp pass-through (floor)"] = floor
        pids["aiohttp pass-through (floor)"] = floor_proc.pid
        nginx = _nginx()
        if nginx:
            port = _free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    tmp=tmp,
                    port=port,
                    champion=champion.removeprefix("http://"),
                    candidate=nginx_candidate.removeprefix("http://"),
                )
            )
            nginx_proc = await asyncio.create_subprocess_exec(
                nginx, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"
            )
            procs.append(nginx_proc)
            targets["nginx mirror"] = f"http://127.0.0.1:{port}"
            pids["nginx mirror"] = nginx_proc.pid
        for name, extra in PROTOTYPES.items():
            proc, base = await _spawn(
                str(ROOT / "benchmarks" / "mirror_floor.py"),
                "--upstream",
                champion,
                "--candidate",
                candidate,
                *extra,
            )
            procs.append(proc)
            targets[name] = base
            pids[name] = proc.pid
        rows = [(name, ROOT) for name in MIRRORGATES if not (args.no_variants and name in VARIANTS)]
        if args.baseline:
            rows += [(name, args.baseline) for name in BASELINE_ROWS]
        for name, root in rows:
            with_cand, process, loop, workers, live_path = MIRRORGATES[name]
            path = tmp / f"{len(targets)}.yaml"
            db = f"sqlite:///{tmp / f'{len(targets)}.sqlite'}"
            config = _proxy_config(
                champion,
                candidate if with_cand else None,
                db,
                process=process,
                event_loop=loop,
                workers=workers,
            )
            if live_path is not None and root == ROOT:  # a baseline tree may predate it
                config["server"]["live_path"] = live_path
            if name == PINNED or (args.isolate and root == ROOT and name != UNPINNED):
                config["server"]["cpus"] = [0]
                config["shadow"]["worker_cpus"] = [1]
            if name == NICED:
                config["shadow"]["worker_nice"] = WORKER_NICE
            path.write_text(yaml.safe_dump(config))
            proc, base = await _spawn_serve(path, root=root)
            procs.append(proc)
            targets[name if root == ROOT else name + BASELINE] = base
            pids[name if root == ROOT else name + BASELINE] = proc.pid
        # extra live processes (server.workers) bind a few seconds after the first one
        await asyncio.sleep(10 if any("2 live" in name for name in targets) else 0)
        n = max(args.requests, args.throughput_requests)
        bodies = [(body, {HEADER_LENGTH: hl}) for body, hl in _bodies(n, args.features)]
        sent = dict.fromkeys(targets, 0)
        connector = aiohttp.TCPConnector(limit=0)
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession(connector=connector) as session:
            for base in targets.values():
                await _wait_ready(session, base)
            if args.isolate:
                # Production's placement on 2 cores: the candidates (their own machines in
                # production) and every mirror's shadow work on CPU 1; the client, the
                # champion and every proxy's live process on CPU 0. mirrorgate pins itself
                # (server.cpus, shadow.worker_cpus); the others are pinned from here.
                for tid in os.listdir("/proc/self/task"):  # this process (the client) only
                    os.sched_setaffinity(int(tid), {0})
                _pin_tree(champ_proc.pid, {0})
                for proc in (nginx_cand_proc, cand_proc):
                    _pin_tree(proc.pid, {1})
                for name, pid in pids.items():
                    if name.startswith("mirrorgate") or name == "direct":
                        continue
                    # live process on 0; a prototype's hand-off child is its shadow work
                    _pin_tree(pid, {0}, children={0} if name == "nginx mirror" else {1})
            infer = {name: f"{base}/v2/models/model/infer" for name, base in targets.items()}
            plan = ((1, args.requests, args.rounds), (32, args.throughput_requests, args.rounds))
            for concurrency, count, rounds in plan:
                lat: dict[str, list[float]] = {t: [] for t in targets}
                wall: dict[str, float] = dict.fromkeys(targets, 0.0)
                for name, url in infer.items():  # warm-up: connections, caches
                    await _drive(session, url, bodies[:50], concurrency)
                    sent[name] += 50
                await asyncio.sleep(1.0)  # mirrored warm-up work done before the CPU count
                cpu_start = {name: _tree_cpu(pid) for name, pid in pids.items()}
                live_start = {name: _tree_cpu(pid, False) for name, pid in pids.items()}
                for _ in range(rounds):
                    for name, url in infer.items():
                        got, seconds = await _drive(session, url, bodies[:count], concurrency)
                        lat[name] += got
                        wall[name] += seconds
                        sent[name] += count
                await asyncio.sleep(1.0)  # the last mirrored calls: their CPU counts too
                cpu_end = {name: _tree_cpu(pid) for name, pid in pids.items()}
                live_end = {name: _tree_cpu(pid, False) for name, pid in pids.items()}
                rows = {}
                for name in targets:
                    cpu = cpu_end[name] - cpu_start[name]
                    rows[name] = {
                        # the target's own processes (proxy + its workers; for direct,
                        # the upstream), all work included, ms per request answered
                        "cpu_ms_per_req": 1000.0 * cpu / (count * rounds),
                        # the first process only (mirrorgate: the live process)
                        "live_cpu_ms_per_req": 1000.0
                        * (live_end[name] - live_start[name])
                        / (count * rounds),
                        "p50_ms": _pct(lat[name], 50),
                        "p99_ms": _pct(lat[name], 99),
                        "req_per_s": len(lat[name]) / wall[name],
                        "n": len(lat[name]),
                    }
                for name in targets:
                    if name != "direct":
                        rows[name]["added_p50_ms"] = rows[name]["p50_ms"] - rows["direct"]["p50_ms"]
                        rows[name]["added_p99_ms"] = rows[name]["p99_ms"] - rows["direct"]["p99_ms"]
                results[f"concurrency {concurrency}"] = rows
            counters: dict[str, dict[str, float]] = {}
            shadowed = [n for n in targets if n.removesuffix(BASELINE) in SHADOWED]
            for name in shadowed:
                # let the last mirrored calls finish before reading the counters
                for _ in range(100):
                    async with session.get(f"{targets[name]}/metrics") as resp:
                        text = await resp.text()
                    if _metric(text, "mirrorgate_shadow_in_flight") == 0:
                        break
                    await asyncio.sleep(0.1)
                counters[name] = {
                    "sent": sent[name],
                    "candidate_ok": _metric(
                        text, 'mirrorgate_proxy_requests_total{code="200",role="candidate"}'
                    ),
                    "dropped": sum(_all(text, "mirrorgate_shadow_dropped_total")),
                    "failed": sum(_all(text, "mirrorgate_shadow_failures_total")),
                }
            for name in PROTOTYPES:
                async with session.get(f"{targets[name]}/_mirror_stats") as resp:
                    stats = json.loads(await resp.read())
                counters[name] = {
                    "sent": sent[name],
                    "candidate_ok": float(stats["finished"]),
                    "dropped": float(stats["dropped"]),
                    "failed": float(stats["failed"]),
                }
            if "nginx mirror" in targets:
                await asyncio.sleep(1.0)
                async with session.get(f"{nginx_candidate}/_stats") as resp:
                    stats = await resp.json()
                counters["nginx mirror"] = {
                    "sent": sent["nginx mirror"],
                    "candidate_ok": float(stats["finished"]),
                    "dropped": float(sent["nginx mirror"] - stats["started"]),
                    "failed": float(stats["started"] - stats["finished"]),
                }
        return {
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
            ),
            "load_before": load_start,
            "load_after": os.getloadavg(),
            "results": results,
            "counters": counters,
            "features": args.features,
            "nginx": nginx is not None,
            "isolate": args.isolate,
        }
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


def _pin_tree(pid: int, cpus: set[int], children: set[int] | None = None) -> None:
    """Every thread of ``pid`` on ``cpus``, its child processes' on ``children``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            _pin_tree(int(child), children if children is not None else cpus)


def _tree_cpu(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of ``pid`` and (``children``) its descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            if not children:
                break
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _all(text: str, prefix: str) -> list[float]:
    return [float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix + "{")]


def _markdown(report: dict[str, Any]) -> str:
    lb, la = report["load_before"], report["load_after"]
    out = [
        f"Machine: {report['machine']}; load average (1/5/15 min) before "
        f"{lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f}, after {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}."
        + (
            " Placement (--isolate): CPU 0 client, champion, live processes; CPU 1"
            " candidates and shadow work."
            if report.get("isolate")
            else ""
        ),
        "",
    ]
    for label, rows in report["results"].items():
        out += [
            f"**{label}** ({rows['direct']['n']} requests per target, interleaved rounds)",
            "",
            "| target | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms "
            "| CPU ms/req | of which live process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            added50 = f"{r['added_p50_ms']:+.2f}" if "added_p50_ms" in r else ""
            added99 = f"{r['added_p99_ms']:+.2f}" if "added_p99_ms" in r else ""
            # direct: the champion upstream serves every row's calls, no per-row figure
            cpu = (
                ""
                if name == "direct"
                else f"{r['cpu_ms_per_req']:.2f} | {r['live_cpu_ms_per_req']:.2f}"
            )
            cpu = cpu or " | "
            out.append(
                f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['req_per_s']:.0f} "
                f"| {added50} | {added99} | {cpu} |"
            )
        out.append("")
    out += ["| mirroring target | requests sent | candidate calls OK | dropped | failed |"]
    out += ["|---|---:|---:|---:|---:|"]
    for name, c in report["counters"].items():
        out.append(
            f"| {name} | {c['sent']} | {c['candidate_ok']:.0f} | {c['dropped']:.0f} "
            f"| {c['failed']:.0f} |"
        )
    c1 = report["results"]["concurrency 1"]
    c32 = report["results"]["concurrency 32"]
    floor = "aiohttp pass-through (floor)"
    out.append("")

    def added_ratio(name: str, base: str, q: str) -> str:
        mine, theirs = c1[name][f"added_{q}_ms"], c1[base][f"added_{q}_ms"]
        if theirs <= 0:
            # the reference added nothing measurable: neighbours' noise, no ratio
            return f"{mine:+.2f} vs {theirs:+.2f} ms"
        return f"{mine / theirs:.2f}"

    mirroring = [n for n in c1 if n.removesuffix(BASELINE) in SHADOWED or n in PROTOTYPES]
    if "nginx mirror" in c1:
        out += [
            "Against nginx mirror (targets: added p50 and p99 <= 1.5x, req/s >= 0.75x):",
            "",
            "| row | added p50 / nginx | added p99 / nginx | req/s / nginx (c=32) |",
            "|---|---:|---:|---:|",
        ]
        for name in mirroring:
            rps = c32[name]["req_per_s"] / c32["nginx mirror"]["req_per_s"]
            out.append(
                f"| {name} | {added_ratio(name, 'nginx mirror', 'p50')} "
                f"| {added_ratio(name, 'nginx mirror', 'p99')} | {rps:.2f} |"
            )
        out.append("")
    out += [
        "Against the aiohttp floor (target for no candidate: <= 1.2x):",
        "",
        "| row | added p50 / floor | added p99 / floor | req/s / floor (c=32) |",
        "|---|---:|---:|---:|",
    ]
    for name in c1:
        if name in ("direct", floor, "nginx mirror"):
            continue
        rps = c32[name]["req_per_s"] / c32[floor]["req_per_s"]
        out.append(
            f"| {name} | {added_ratio(name, floor, 'p50')} "
            f"| {added_ratio(name, floor, 'p99')} | {rps:.2f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="c=1: per target per round")
    parser.add_argument(
        "--throughput-requests", type=int, default=400, help="c=32: per target per round"
    )
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="CPU 0: client, champion, live processes; CPU 1: candidates, shadow work",
    )
    parser.add_argument(
        "--no-variants", action="store_true", help="skip the in-process and 2-live-process rows"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. main): its no-candidate and default shadow rows run "
        "too, interleaved with this tree's, for a before/after from one run",
    )
    ns = parser.parse_args()
    report = asyncio.run(main(ns))
    print(json.dumps(report, indent=2) if ns.json else _markdown(report))
