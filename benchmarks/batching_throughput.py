"""In-process throughput: micro-batching vs the raw runtime at the same batch size.

Side by side, in one process, on one ONNX MLP (built here), interleaved over rounds so
that the shared machine's noise hits every scenario alike; each figure is the median
over rounds:

  raw-b1        onnxruntime ``session.run`` on 1 row, called back to back (no asyncio)
  raw-bB        onnxruntime ``session.run`` on B rows from ``slots`` threads: the compute
                floor that batched serving can at best reach
  backend-b1    OnnxBackend, C concurrent clients sending 1-row requests, no batching
  batched-bB    BatchingBackend(OnnxBackend), the same C clients, max_batch_size B
  clients-only  the same C clients against a stub that answers every request from a
                future resolved B rows at a time, no model and no batcher: what the
                clients' own asyncio cost (one task wake-up per request) allows here.
                No in-process path that serves one awaitable call per request can beat
                it, so it is the fair ceiling beside the runtime floor raw-bB
  base-bB       (with ``--baseline DIR``) batched-bB with batching.py and onnx.py loaded
                from another checkout (e.g. main), for a side-by-side comparison

``--rows-per-request R`` makes each request carry R rows (the shape of a multi-row HTTP
request, which reaches ``infer`` as one call); the floor rows stay as they are.

Run from the repository root:
    python benchmarks/batching_throughput.py [--batch-size 32 --concurrency 64 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from proxy.backends.batching import BatchingBackend  # noqa: E402
from proxy.backends.onnx import OnnxBackend  # noqa: E402
from proxy.core.config import BackendSettings, BatchingSettings  # noqa: E402
from tests.proxy.models import build_onnx_mlp, mlp_oracle  # noqa: E402


def raw_rate(session: Any, x: np.ndarray, seconds: float, callers: int) -> float:
    """Rows per second of ``session.run`` on ``x`` from ``callers`` threads, back to back."""
    stop = time.perf_counter() + seconds
    counts = [0] * callers

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, {"x": x})
            counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(loop, range(callers)))
    return sum(counts) * x.shape[0] / (time.perf_counter() - start)


async def served_rate(
    backend: Any, pool: np.ndarray, seconds: float, concurrency: int, per_request: int = 1
) -> tuple[float, list[float]]:
    """Rows/s and per-request latencies (ms) of ``concurrency`` closed-loop clients, each
    request carrying ``per_request`` rows."""
    starts = len(pool) - per_request + 1
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    latencies: list[float] = []
    rows = 0

    async def client(i: int) -> None:
        nonlocal rows
        j = i
        while loop.time() < stop:
            k = j % starts
            x = pool[k : k + per_request]
            t0 = time.perf_counter()
            await backend.infer({"x": x})
            latencies.append((time.perf_counter() - t0) * 1000.0)
            rows += per_request
            j += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return rows / (time.perf_counter() - start), latencies


class ClientsOnly:
    """Answers each request with its own input, B rows at a time, from one loop callback."""

    def __init__(self, batch: int) -> None:
        self._batch = batch
        self._rows = 0
        self._waiting: list[tuple[asyncio.Future[Any], dict[str, np.ndarray]]] = []

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._rows = 0
        for future, inputs in waiting:
            future.set_result(inputs)

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        self._waiting.append((future, inputs))
        self._rows += inputs["x"].shape[0]
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)
        if self._rows >= self._batch:
            self._flush()
        return await future


def load_baseline(root: Path) -> tuple[Any, Any]:
    """``BatchingBackend`` and ``OnnxBackend`` from another checkout's files (the rest of
    ``proxy`` is this checkout's)."""
    classes = []
    for module, cls in (("onnx", "OnnxBackend"), ("batching", "BatchingBackend")):
        spec = importlib.util.spec_from_file_location(
            f"baseline_{module}", root / "proxy" / "backends" / f"{module}.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        classes.append(getattr(mod, cls))
    return classes[0], classes[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mirrorgate-bench-"))
    path = tmp / "mlp.onnx"
    params = build_onnx_mlp(path, args.features, args.hidden, args.classes, seed=0)
    settings = BackendSettings(name="mlp", kind="onnx", path=str(path), threads=args.threads)
    plain = await OnnxBackend.create(settings)
    batched = BatchingBackend(
        await OnnxBackend.create(settings),
        BatchingSettings(max_batch_size=args.batch_size, max_batch_delay_ms=args.delay_ms),
        CollectorRegistry(),
        max_concurrent_batches=args.slots,
    )
    base = None
    if args.baseline:
        base_onnx, base_batching = load_baseline(Path(args.baseline))
        base = base_batching(
            await base_onnx.create(settings),
            BatchingSettings(max_batch_size=args.batch_size, max_batch_delay_ms=args.delay_ms),
            CollectorRegistry(),
            max_concurrent_batches=args.slots,
        )
    stub = ClientsOnly(args.batch_size)
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(4096, args.features)).astype(np.float32)
    xb = pool[: args.batch_size]

    # The batched path must compute what the model computes.
    outs = await asyncio.gather(*(batched.infer({"x": pool[i : i + 1]}) for i in range(64)))
    got = np.concatenate([o["probs"] for o in outs])
    max_err = float(np.abs(got - mlp_oracle(params, pool[:64])).max())
    assert max_err < 1e-4, f"batched outputs disagree with numpy: {max_err}"

    session = plain._session  # the raw runtime, called directly for the floors
    session.run(None, {"x": xb})  # warm-up
    await served_rate(plain, pool, 0.3, args.concurrency)
    await served_rate(batched, pool, 0.3, args.concurrency)
    served = {"backend-b1": plain, "batched-bB": batched, "clients-only": stub}
    if base is not None:
        served["base-bB"] = base
        await served_rate(base, pool, 0.3, args.concurrency)

    results: dict[str, list[float]] = {k: [] for k in ("raw-b1", "raw-bB", *served)}
    lat: dict[str, list[float]] = {k: [] for k in served}
    calls0, rows0 = batched.calls, batched.rows
    for _ in range(args.rounds):
        results["raw-b1"].append(
            await asyncio.to_thread(raw_rate, session, pool[:1], args.seconds, 1)
        )
        results["raw-bB"].append(
            await asyncio.to_thread(raw_rate, session, xb, args.seconds, args.slots)
        )
        for key, backend in served.items():
            rate, lats = await served_rate(
                backend, pool, args.seconds, args.concurrency, args.rows_per_request
            )
            results[key].append(rate)
            lat[key] += lats
    mean_batch = (batched.rows - rows0) / max(1, batched.calls - calls0)
    await plain.aclose()
    await batched.aclose()
    if base is not None:
        await base.aclose()
    medians = {k: statistics.median(v) for k, v in results.items()}
    extra = {}
    if base is not None:
        extra["base_vs_floor"] = medians["base-bB"] / medians["raw-bB"]
        extra["batched_vs_base"] = medians["batched-bB"] / medians["base-bB"]
    return {
        "load_average": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "threads_active": threading.active_count(),
        "rows_per_s": medians,
        "rows_per_s_rounds": results,
        "latency_ms": {
            k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in lat.items()
        },
        "mean_batch_rows": mean_batch,
        "batched_vs_floor": medians["batched-bB"] / medians["raw-bB"],
        "batched_vs_unbatched": medians["batched-bB"] / medians["backend-b1"],
        "batched_vs_clients_only": medians["batched-bB"] / medians["clients-only"],
        "clients_only_vs_floor": medians["clients-only"] / medians["raw-bB"],
        **extra,
        "max_abs_err_vs_numpy": max_err,
    }


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    b = c["batch_size"]
    rows = [
        ("raw runtime, batch 1, 1 caller", "raw-b1", "-"),
        (f"raw runtime, batch {b}, {c['slots']} callers (floor)", "raw-bB", "-"),
        (f"OnnxBackend, no batching, {c['concurrency']} clients", "backend-b1", "backend-b1"),
        (f"BatchingBackend max {b}, {c['concurrency']} clients", "batched-bB", "batched-bB"),
        (f"clients only (stub answering {b} at a time)", "clients-only", "clients-only"),
    ]
    if "base-bB" in r["rows_per_s"]:
        rows.append((f"baseline BatchingBackend ({c['baseline']})", "base-bB", "base-bB"))
    out = [
        f"MLP {c['features']}-{c['hidden']}-{c['classes']}, onnxruntime threads="
        f"{c['threads']}, delay {c['delay_ms']} ms, {c['rounds']} rounds x {c['seconds']} s, "
        f"{c['rows_per_request']} row(s) per request, "
        f"load average {' '.join(f'{x:.1f}' for x in r['load_average'])}",
        "",
        "| scenario | rows/s (median) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for label, key, lkey in rows:
        p50 = p99 = "-"
        if lkey != "-":
            p50 = f"{r['latency_ms'][lkey]['p50']:.2f}"
            p99 = f"{r['latency_ms'][lkey]['p99']:.2f}"
        out.append(f"| {label} | {r['rows_per_s'][key]:,.0f} | {p50} | {p99} |")
    out += [
        "",
        f"mean rows per batched runtime call: {r['mean_batch_rows']:.1f}",
        f"batched / floor: {r['batched_vs_floor']:.0%}; "
        f"batched / unbatched: {r['batched_vs_unbatched']:.1f}x; "
        f"max |batched - numpy|: {r['max_abs_err_vs_numpy']:.1e}",
        f"batched / clients only: {r['batched_vs_clients_only']:.0%}; "
        f"clients only / floor: {r['clients_only_vs_floor']:.0%}",
    ]
    if "base_vs_floor" in r:
        out.append(
            f"baseline / floor: {r['base_vs_floor']:.0%}; "
            f"batched / baseline: {r['batched_vs_base']:.2f}x"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--slots", type=int, default=2, help="max_concurrent_batches")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument(
        "--rows-per-request",
        type=int,
        default=1,
        help="rows each client request carries (as one multi-row HTTP request would)",
    )
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seconds", type=float, default=2.0, help="per scenario per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--baseline", default="", help="another checkout whose batching.py/onnx.py to compare"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
