#!/usr/bin/env python3
"""How long the demo's traffic takes over HTTP, client side plus a minimal server.

    python benchmarks/demo_traffic_http.py [--mode fast|full|both] [--concurrency 8]

Runs one event loop with (a) a minimal stand-in for the proxy on a free loopback port:
the two routes the demo uses, the champion answering through an executor thread and the
candidate run after the response (shadow), labels accepted and counted; and (b)
``proxy.demo.driver.drive`` sending the scenario. The real proxy does more per request
(recording, gates, metrics), so this is a floor for the demo's HTTP time, not a forecast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.demo import assets  # noqa: E402
from proxy.demo.driver import drive  # noqa: E402
from proxy.demo.offline import OfflineModel  # noqa: E402
from proxy.demo.traffic import SCENARIOS, Traffic  # noqa: E402


async def run(mode: str, concurrency: int) -> dict[str, object]:
    champion = OfflineModel(assets.model_path(assets.CHAMPION))
    candidate = OfflineModel(assets.model_path(assets.CANDIDATE_REGRESSED))
    pool = ThreadPoolExecutor(max_workers=2)
    loop = asyncio.get_running_loop()
    shadow: set[asyncio.Future[np.ndarray]] = set()
    labels = 0

    async def infer(request: web.Request) -> web.Response:
        body = await request.json()
        (tensor,) = body["inputs"]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probs = await loop.run_in_executor(pool, champion.predict_proba, x)
        fut = loop.run_in_executor(pool, candidate.predict_proba, x)
        shadow.add(fut)
        fut.add_done_callback(shadow.discard)
        return web.json_response(
            {
                "id": body["id"],
                "model_name": "digits",
                "outputs": [
                    {
                        "name": "probabilities",
                        "shape": list(probs.shape),
                        "datatype": "FP32",
                        "data": probs.ravel().tolist(),
                    }
                ],
            }
        )

    async def feedback(request: web.Request) -> web.Response:
        nonlocal labels
        labels += len(await request.json())
        return web.json_response({"accepted": True})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_post("/v1/feedback", feedback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        traffic = Traffic(SCENARIOS[mode])
        stats = await drive(
            traffic, f"http://127.0.0.1:{port}", model="digits", concurrency=concurrency
        )
        if shadow:
            await asyncio.wait(list(shadow))
    finally:
        await runner.cleanup()
        pool.shutdown()
    return {
        "mode": mode,
        "requests": stats.requests,
        "rows": stats.rows,
        "labels": labels,
        "elapsed_s": round(stats.elapsed_s, 2),
        "requests_per_s": round(stats.requests / stats.elapsed_s, 1),
        "rows_per_s": round(stats.rows / stats.elapsed_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["fast", "full", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    modes = ["fast", "full"] if args.mode == "both" else [args.mode]
    for mode in modes:
        print(asyncio.run(run(mode, args.concurrency)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
