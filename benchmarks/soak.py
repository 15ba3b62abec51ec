"""Soak: a real ``mirrorgate serve`` under closed-loop load with labels and harvesting on.

CONCURRENCY clients send V2 infer requests back to back; every request is labelled
(``POST /v1/feedback``, random labels, so the ``wrong_label`` harvest rule fires on
about half of them and the harvest caps are exercised). The proxy's VmRSS is sampled
every SAMPLE requests; the report gives live failures, throughput and memory growth
per 10k requests after the warm-up (a least-squares slope over the samples past
WARMUP requests).

    python benchmarks/soak.py [--requests 6000] [--concurrency 8] [--json]
        [--trace DIR] [--progress] [--max-s SECONDS]

The candidate is random, so the gates abort it after a few hundred pairs; the soak sets
``mirror.shadow_after_abort: true`` so that the shadow side (candidate calls, pairing,
recording, gates, labels, harvesting) stays busy for the whole run
(``--no-shadow-after-abort``: round 3's soak, mirroring stops at the abort). Every
``--poll-s`` seconds the proxy's own counters are read (/metrics, GET /v1/rollout): the
report's ``shadow_busy`` gives candidate calls, pairs and labels written per request sent
in each window (about 1 when busy, 0 once mirroring stopped). ``--shadow-process``
(default false, the in-process dispatcher) runs the shadow work in a worker process; the
VmRSS of the live process and of the worker are then sampled and their slopes reported
separately and summed. ``--trace DIR`` runs ``serve`` under
tracemalloc (benchmarks/_traced_serve.py, much slower) and takes a snapshot of both
processes at the end of the warm-up and at the end; the top growth by source line of
each is printed (the snapshots stay in DIR). ``--progress`` prints a line per sample to
stderr (for long runs with output in a log file); ``--max-s`` stops sending after that
many seconds (the report's ``requests`` is what was sent). Any ``SOAK_*`` variable in
the environment runs serve through benchmarks/_traced_serve.py; ``SOAK_STATS_DIR=DIR``
(and ``SOAK_STATS_S``) makes each process sample smaps_rollup, SQLite's heap, object
counts and its largest containers into ``DIR/stats-<pid>.jsonl`` (docs/faults.md,
"Round 5").

The issue's target is 200k requests; on this shared 2-core machine a run is kept
short (say so when quoting it). The load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.helpers import AUTH, TOKEN, body, own_upstream, ready, rss_kib, until
from tests.proxy.conftest import N_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the child inherits the descriptor; ours closes after spawn


async def _serve(config: dict[str, Any], tmp: Path, trace: Path | None) -> tuple[Any, str]:
    """``serve`` as a child; stderr goes to a file (a pipe nobody reads for an hour
    could fill and block the proxy). Returns (process, base url)."""
    path = tmp / "mirrorgate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    argv = ["-m", "proxy"]
    if trace is not None:
        env["SOAK_TRACE_DIR"] = str(trace)
    if any(k.startswith("SOAK_") for k in env):  # diagnostics: benchmarks/_traced_serve.py
        argv = [str(ROOT / "benchmarks" / "_traced_serve.py")]
    with _log_file(tmp / "serve.stderr") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
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
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    if not line.startswith("mirrorgate: listening on "):
        raise AssertionError(f"serve did not start: {line!r}\n{(tmp / 'serve.stderr').read_text()}")
    return proc, line.split()[-1]


def _worker_pid(tmp: Path) -> int | None:
    """The shadow worker's pid, from the line serve prints when it starts it."""
    for line in (tmp / "serve.stderr").read_text(errors="replace").splitlines():
        if line.startswith("mirrorgate: shadow worker pid "):
            return int(line.split()[-1])
    return None


def _rss_parts(pid: int) -> dict[str, float]:
    """RssAnon / RssFile / RssShmem in MiB: heap growth is anonymous memory."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def _sum(families: dict[str, Any], name: str, **labels: str) -> float:
    fam = families.get(name)
    if fam is None:
        return float("nan")
    return float(
        sum(
            s.value
            for s in fam.samples
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
        )
    )


async def _shadow_counters(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """What the proxy itself says it did on the shadow side (/metrics, GET /v1/rollout)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(f"{base}/metrics", headers=AUTH) as resp:
        text = await resp.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    async with session.get(f"{base}/v1/rollout", headers=AUTH) as resp:
        rollout = await resp.json()
    harvest = (
        {
            s.labels["outcome"]: s.value
            for s in fams["mirrorgate_harvest_cases"].samples
            if s.name.endswith("_total")
        }
        if "mirrorgate_harvest_cases" in fams
        else {}
    )
    return {
        "candidate_calls": _sum(fams, "mirrorgate_proxy_requests", role="candidate"),
        "champion_calls": _sum(fams, "mirrorgate_proxy_requests", role="champion"),
        "pairs_written": _sum(fams, "mirrorgate_recorder_written"),
        "pairs_dropped": _sum(fams, "mirrorgate_recorder_dropped"),
        "labels_written": _sum(fams, "mirrorgate_recorder_labels_written"),
        "labels_dropped": _sum(fams, "mirrorgate_recorder_labels_dropped"),
        "shadow_dropped": _sum(fams, "mirrorgate_shadow_dropped"),
        "shadow_failures": _sum(fams, "mirrorgate_shadow_failures"),
        "harvest": harvest,
        "verdict": rollout.get("verdict", rollout.get("status")),
        "n_pairs_rollout": rollout.get("n_pairs", rollout.get("pairs")),
    }


def _busy(windows: list[dict[str, Any]], done: int) -> dict[str, Any]:
    """Per poll window: candidate calls and pairs written per request sent in it. A
    shadow side that went quiet (an abort without shadow_after_abort) shows as ~0."""
    rows = []
    for a, b in itertools.pairwise(windows):
        dn = b["requests"] - a["requests"]
        if dn <= 0:
            continue
        rows.append(
            {
                "requests": b["requests"],
                "candidate_per_request": round(
                    (b["candidate_calls"] - a["candidate_calls"]) / dn, 3
                ),
                "pairs_per_request": round((b["pairs_written"] - a["pairs_written"]) / dn, 3),
                "labels_per_request": round((b["labels_written"] - a["labels_written"]) / dn, 3),
            }
        )
    return {
        "windows": len(rows),
        "min_candidate_per_request": min((r["candidate_per_request"] for r in rows), default=None),
        "min_pairs_per_request": min((r["pairs_per_request"] for r in rows), default=None),
        "min_labels_per_request": min((r["labels_per_request"] for r in rows), default=None),
        "per_window": rows,
    }


def _slope(samples: list[tuple[int, float]], warmup: int) -> float:
    """Least-squares MiB per 10k requests over the samples at or past ``warmup``."""
    after = [(k, v) for k, v in samples if k >= warmup]
    if len(after) < 2:
        return float("nan")
    xs = np.array([k for k, _ in after], dtype=float)
    ys = np.array([v for _, v in after], dtype=float)
    return float(np.polyfit(xs, ys, 1)[0]) * 10_000


async def _snapshot(trace: Path, pids: list[int], n: int) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    for pid in pids:
        await until(lambda pid=pid: (trace / f"{pid}-{n}.snap").exists(), "snapshot", 6000)


def _trace_report(trace: Path, pid: int, top: int = 25) -> list[str]:
    first = tracemalloc.Snapshot.load(str(trace / f"{pid}-1.snap"))
    last = tracemalloc.Snapshot.load(str(trace / f"{pid}-2.snap"))
    out = []
    for stat in last.compare_to(first, "traceback")[:top]:
        frames = " <- ".join(
            f"{f.filename.split('/mirrorgate/')[-1]}:{f.lineno}" for f in stat.traceback
        )
        out.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {frames}")
    return out


async def main(
    n: int,
    concurrency: int,
    sample: int,
    warmup: int,
    trace: Path | None,
    progress: bool,
    max_s: float | None = None,
    shadow_after_abort: bool = True,
    shadow_process: bool | str = False,
    poll_s: float = 30.0,
) -> dict[str, Any]:
    champion = await own_upstream(seed=1)
    candidate = await own_upstream(seed=2)
    tmp = Path(tempfile.mkdtemp(prefix="mg-soak-"))

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 5000}

    config = {
        "server": {"model_name": "classifier", "control_token": TOKEN},
        "models": {
            "champion": model("champion", champion.url),
            "candidate": model("c", candidate.url),
        },
        # shadow_after_abort: the gates abort this random candidate after a few hundred
        # pairs; without it the rest of the soak would mirror nothing (round 3 found 99.8%
        # of a 200k soak ran with no candidate calls, pairs or harvesting).
        "mirror": {"timeout_ms": 2000, "shadow_after_abort": shadow_after_abort},
        "shadow": {"process": shadow_process},
        "storage": {"url": f"sqlite:///{tmp / 'pairs.sqlite'}"},
    }
    proc, base = await _serve(config, tmp, trace)
    assert proc.pid is not None
    await until(lambda: ready(base), "proxy ready")
    worker = _worker_pid(tmp)
    pids = [proc.pid] + ([worker] if worker is not None else [])
    counter = {"next": 0, "done": 0, "failures": 0}
    samples: list[tuple[int, float, float]] = []  # (requests, live MiB, worker MiB)
    parts: list[tuple[int, dict[str, float]]] = []
    snap = asyncio.Event()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES, size=n + concurrency)

    async def client(session: aiohttp.ClientSession) -> None:
        while counter["next"] < n:
            if max_s is not None and time.perf_counter() - t0 > max_s:
                break  # the time box: the report says how many requests were sent
            counter["next"] += 1
            i = counter["next"]
            try:
                async with session.post(f"{base}/v2/models/classifier/infer", json=body(i)) as resp:
                    await resp.read()
                    if resp.status != 200:
                        counter["failures"] += 1
                async with session.post(
                    f"{base}/v1/feedback",
                    json={"id": f"r{i}", "label": int(labels[i])},
                    headers=AUTH,
                ) as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                counter["failures"] += 1
            counter["done"] += 1
            if counter["done"] % sample == 0:
                live = rss_kib(proc.pid) / 1024.0
                shadow = rss_kib(worker) / 1024.0 if worker is not None else 0.0
                samples.append((counter["done"], live, shadow))
                parts.append((counter["done"], _rss_parts(proc.pid)))
                if progress:
                    print(
                        f"{time.strftime('%H:%M:%S')} {counter['done']} requests, "
                        f"{counter['done'] / (time.perf_counter() - t0):.1f}/s, "
                        f"failures {counter['failures']}, live {live:.1f} MiB, "
                        f"worker {shadow:.1f} MiB, load {os.getloadavg()[0]:.1f}",
                        file=sys.stderr,
                        flush=True,
                    )
            if trace is not None and counter["done"] == warmup:
                snap.set()

    windows: list[dict[str, float]] = []  # the proxy's own counters, every poll_s

    async def poll(session: aiohttp.ClientSession) -> None:
        """The shadow side's counters through the run: busy throughout, not just at first."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
            try:
                windows.append(
                    {"requests": counter["done"], **await _shadow_counters(session, base)}
                )
            except (aiohttp.ClientError, TimeoutError):
                pass  # a missed poll is no failure of the live path

    stop = asyncio.Event()

    async def snapshots() -> None:
        assert trace is not None
        await snap.wait()
        await _snapshot(trace, pids, 1)

    started = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            poller = asyncio.ensure_future(poll(session))
            tasks = [client(session) for _ in range(concurrency)]
            if trace is not None:
                tasks.append(snapshots())
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(3)  # let the last mirrored calls and writes land
            stop.set()
            await poller
            final = await _shadow_counters(session, base)
        if trace is not None:
            await _snapshot(trace, pids, 2)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v1/rollout", headers=AUTH) as resp:
                harvest = (await resp.json()).get("harvest")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        await champion.close()
        await candidate.close()
    live_slope = _slope([(k, a) for k, a, _ in samples], warmup)
    worker_slope = _slope([(k, b) for k, _, b in samples], warmup)
    report: dict[str, Any] = {
        "requests": counter["done"],
        "requests_asked": n,
        "concurrency": concurrency,
        "live_failures": counter["failures"],
        "requests_per_s": counter["done"] / elapsed,
        "shadow_worker": worker is not None,
        "rss_mib": [(k, round(a, 1), round(b, 1)) for k, a, b in samples],
        "rss_growth_mib_per_10k_after_warmup": {
            "live": live_slope,
            "worker": worker_slope,
            "total": live_slope + worker_slope,
        },
        "warmup": warmup,
        "live_rss_parts_mib": parts,
        "live_anon_growth_mib_per_10k_after_warmup": _slope(
            [(k, p.get("RssAnon", 0.0)) for k, p in parts], warmup
        ),
        "harvest": harvest,
        "shadow_after_abort": shadow_after_abort,
        "shadow_counters_end": final,
        "shadow_counters_windows": windows,
        "shadow_busy": _busy(windows, counter["done"]),
    }
    if trace is not None:
        report["tracemalloc_growth"] = {str(pid): _trace_report(trace, pid) for pid in pids}
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=1500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace", type=Path, default=None, help="tracemalloc snapshots here")
    parser.add_argument("--max-s", type=float, default=None, help="stop sending after this")
    parser.add_argument("--progress", action="store_true", help="a line per sample (stderr)")
    parser.add_argument(
        "--no-shadow-after-abort",
        dest="shadow_after_abort",
        action="store_false",
        help="let an abort stop the mirroring (round 3's soak: mostly post-abort)",
    )
    parser.add_argument("--shadow-process", choices=["false", "true", "auto"], default="false")
    parser.add_argument("--poll-s", type=float, default=30.0, help="proxy counters every so often")
    args = parser.parse_args()
    if args.trace is not None:
        args.trace = args.trace.resolve()  # serve runs in its own working directory
        args.trace.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    report = asyncio.run(
        main(
            args.requests,
            args.concurrency,
            args.sample,
            args.warmup,
            args.trace,
            args.progress,
            args.max_s,
            args.shadow_after_abort,
            {"false": False, "true": True}.get(args.shadow_process, "auto"),
            args.poll_s,
        )
    )
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(json.dumps(report, indent=None if not args.json else 2))
