"""A tiny KServe V2 (Open Inference Protocol) model server for the deployment tests.

It stands in for Triton/MLServer as mirrorgate's ``http`` upstream: health, server and
model metadata, model readiness and infer, with JSON tensors and the binary tensor data
extension in both directions. Every model answers with fixed class probabilities per row
(``PROBS[model]``), so a test can tell which model produced a response.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

INPUT = {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}
OUTPUT = {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
PROBS = {"classifier": [0.25, 0.75], "classifier-candidate": [0.375, 0.625]}
HEADER = "Inference-Header-Content-Length"
# Per model: the revision named in its metadata's X-Model-Revision header (none: no
# header), and the inference calls answered (tests change and read these).
REVISIONS: dict[str, str] = {}
CALLS: dict[str, int] = {}


def _model(request: web.Request) -> str:
    name = request.match_info["model"]
    if name not in PROBS:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"unknown model {name}"}), content_type="application/json"
        )
    return name


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({})


async def _server(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "v2-upstream", "version": "1", "extensions": ["binary_tensor_data"]}
    )


async def _metadata(request: web.Request) -> web.Response:
    name = _model(request)
    revision = REVISIONS.get(name)
    return web.json_response(
        {
            "name": name,
            "versions": ["1"],
            "platform": "test",
            "inputs": [INPUT],
            "outputs": [OUTPUT],
        },
        headers={"X-Model-Revision": revision} if revision else None,
    )


async def _ready(request: web.Request) -> web.Response:
    _model(request)
    return web.json_response({})


def _rows(tensor: dict[str, Any]) -> int:
    shape = tensor.get("shape") or [1]
    return int(shape[0])


async def _infer(request: web.Request) -> web.Response:
    name = _model(request)
    CALLS[name] = CALLS.get(name, 0) + 1
    body = await request.read()
    header_len = request.headers.get(HEADER)
    head = body[: int(header_len)] if header_len is not None else body
    try:
        payload = json.loads(head)
        rows = _rows(payload["inputs"][0])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"malformed request: {exc}"}), content_type="application/json"
        ) from exc
    values = PROBS[name] * rows
    want_binary = bool((payload.get("parameters") or {}).get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in payload.get("outputs") or []
    )
    output: dict[str, Any] = {"name": OUTPUT["name"], "datatype": "FP32", "shape": [rows, 2]}
    response: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": [output]}
    if "id" in payload:
        response["id"] = payload["id"]
    if not want_binary:
        output["data"] = values
        return web.json_response(response)
    blob = struct.pack(f"<{len(values)}f", *values)
    output["parameters"] = {"binary_data_size": len(blob)}
    head_bytes = json.dumps(response).encode()
    return web.Response(
        body=head_bytes + blob,
        headers={HEADER: str(len(head_bytes))},
        content_type="application/octet-stream",
    )


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v2/health/live", _ok)
    app.router.add_get("/v2/health/ready", _ok)
    app.router.add_get("/v2", _server)
    app.router.add_get("/v2/models/{model}", _metadata)
    app.router.add_get("/v2/models/{model}/versions/{version}", _metadata)
    app.router.add_get("/v2/models/{model}/ready", _ready)
    app.router.add_post("/v2/models/{model}/infer", _infer)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", _infer)
    return app


@contextmanager
def running_upstream() -> Iterator[str]:
    """Serve on a free loopback port in a background thread; yields the base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app())
    started = threading.Event()
    port: list[int] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port.append(int(runner.addresses[0][1]))
        started.set()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("V2 upstream did not start")
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
