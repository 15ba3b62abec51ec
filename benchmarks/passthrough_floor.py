"""The Python floor for a proxy: a minimal aiohttp pass-through (no parsing, no mirror).

    python benchmarks/passthrough_floor.py --upstream http://127.0.0.1:8001 [--port 0]

Forwards each POST body (and the V2 binary header) to the upstream on a pooled
connection and returns the upstream's status, body and content headers. Used by
benchmarks/proxy_overhead.py as the "aiohttp pass-through" row: what any Python proxy
on one aiohttp event loop costs at least.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HEADERS = ("Content-Type", "Inference-Header-Content-Length")


async def main(upstream: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: request.headers[k] for k in HEADERS if k in request.headers}
        async with session.post(upstream + request.path, data=body, headers=headers) as resp:
            data = await resp.read()
            out = {k: resp.headers[k] for k in HEADERS if k in resp.headers}
            return web.Response(status=resp.status, body=data, headers=out)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"floor: listening on http://{host}:{bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    ns = parser.parse_args()
    asyncio.run(main(ns.upstream.rstrip("/"), ns.port))
