"""A test-only Open Inference Protocol (KServe V2) server with fault injection.

It computes ``probs = softmax(x @ W + b)`` (plus ``label = argmax``) for a seeded random
linear model, over real HTTP with the same codec as the proxy (JSON and binary tensors),
so it can stand in for Triton/KServe as a champion or candidate behind ``HttpBackend``.
Later tests use it to inject faults into either side.

Use in-process (pytest-aiohttp)::

    upstream = Upstream(UpstreamModel(n_features=4, n_classes=3, seed=1))
    server = await aiohttp_server(upstream.app())
    url = str(server.make_url("")).rstrip("/")
    upstream.set_fault("slow", delay_s=0.2)      # or Fault(...) objects
    upstream.set_fault("hold")                   # park calls until upstream.release()
    assert upstream.stats.started == 3 and upstream.stats.finished == 0
    upstream.release()

or as a process (benchmarks, compose, another language's tests)::

    python -m tests.proxy.upstream --port 8001 --features 4 --classes 3 --seed 1
    curl -X POST localhost:8001/_fault -d '{"mode": "error", "status": 500}'
    curl localhost:8001/_stats

Besides the softmax model, every server serves ``echo`` (outputs = its inputs, any
datatype), for datatype round trips through the proxy.

Fault modes (``Fault.mode``), applied to a ``rate`` share of calls (seeded):

=============  ============================================================================
normal         answer correctly
slow           sleep ``delay_s``, then answer
hold           wait until ``release()`` (or ``POST /_release``), then answer
hang           never answer (until the server shuts down): exercises client timeouts
error          HTTP ``status`` with ``{"error": message}``
garbage        200 with a tensor whose declared shape disagrees with its data
wrong_rows     200 with a well-formed output that has one row too many
nan            200 with every probability NaN
non_json       200 with an HTML body
crash          start a 200 response, send part of the body, drop the connection
=============  ============================================================================

Every call appends ``("start", id)`` and ``("finish", id)`` to ``events`` (bounded), so
tests assert on ordering and counts, never on wall-clock time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from proxy.protocol.codec import (
    HEADER_LENGTH,
    encode_infer_response,
    error_body,
    parse_infer_request,
)

# Every server also serves model "echo": outputs = inputs, same names, any datatype (it
# declares no inputs/outputs in its metadata). For datatype round trips through a proxy.
ECHO = "echo"

MODES = (
    "normal",
    "slow",
    "hold",
    "hang",
    "error",
    "garbage",
    "wrong_rows",
    "nan",
    "non_json",
    "crash",
)


@dataclass
class Fault:
    mode: str = "normal"
    delay_s: float = 0.0
    status: int = 500
    message: str = "injected failure"
    rate: float = 1.0  # share of calls the fault applies to; the rest answer normally

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(MODES)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")


@dataclass
class Stats:
    started: int = 0
    finished: int = 0
    faulted: int = 0
    max_in_flight: int = 0

    @property
    def in_flight(self) -> int:
        return self.started - self.finished


class UpstreamModel:
    """``softmax(x @ W + b)``: the numpy oracle the proxy's outputs are checked against."""

    def __init__(
        self,
        n_features: int = 4,
        n_classes: int = 3,
        seed: int = 0,
        *,
        name: str = "model",
        input_name: str = "x",
        output_name: str = "probs",
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_features = n_features
        self.n_classes = n_classes
        self.name = name
        self.input_name = input_name
        self.output_name = output_name
        self.weights = rng.normal(size=(n_features, n_classes)).astype(np.float32)
        self.bias = rng.normal(size=(n_classes,)).astype(np.float32)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        logits = np.asarray(x, dtype=np.float32) @ self.weights + self.bias
        logits = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        probs = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
        return {self.output_name: probs, "label": probs.argmax(axis=-1).astype(np.int64)}

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "numpy_softmax",
            "inputs": [
                {"name": self.input_name, "datatype": "FP32", "shape": [-1, self.n_features]}
            ],
            "outputs": [
                {"name": self.output_name, "datatype": "FP32", "shape": [-1, self.n_classes]},
                {"name": "label", "datatype": "INT64", "shape": [-1]},
            ],
        }


def _decoded(body: bytes, coding: str) -> bytes:
    """A request body of ``coding`` (KeyError: a coding this server does not take)."""
    if coding == "identity":
        return body
    if coding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.decompress(body, zlib.MAX_WBITS if body[:1] == b"x" else -zlib.MAX_WBITS)
    raise KeyError(coding)


@dataclass
class Upstream:
    model: UpstreamModel = field(default_factory=UpstreamModel)
    fault: Fault = field(default_factory=Fault)
    seed: int = 0
    stats: Stats = field(default_factory=Stats)
    events: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=100_000))
    # When True, metadata requests also wait for release(): a model that loads slowly.
    hold_metadata: bool = False
    # Every infer request's headers and requested output names (None: none named), so
    # tests see what the proxy sent on: (headers, outputs, binary?).
    seen: deque[tuple[dict[str, str], list[str] | None, bool]] = field(
        default_factory=lambda: deque(maxlen=1000)
    )
    # False: GET /v2 lists no binary extension (a JSON-only server such as MLServer).
    binary_extension: bool = True
    # True: request bodies are read as they arrived (aiohttp's decompression off) and
    # every infer request's (headers, raw body bytes) lands in ``received``; the server
    # then decodes gzip/deflate itself and answers 415 to any other coding, as a strict
    # V2 server would. Set before app() is called.
    raw_bodies: bool = False
    received: deque[tuple[dict[str, str], bytes]] = field(
        default_factory=lambda: deque(maxlen=1000)
    )

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._release = asyncio.Event()
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------ control

    def set_fault(self, mode: str | Fault = "normal", **kwargs: Any) -> None:
        self.fault = mode if isinstance(mode, Fault) else Fault(mode, **kwargs)
        if self.fault.mode == "hold":
            self._release = asyncio.Event()

    async def wait_for(self, started: int = 0, finished: int = 0) -> None:
        """Wait (event-driven) until at least this many calls started / finished."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.stats.started >= started and self.stats.finished >= finished
            )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def release(self) -> None:
        """Let every held call (and later ones, until the next ``set_fault``) answer."""
        self._release.set()

    # ------------------------------------------------------------------ server

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=64 * 1024 * 1024,
            handler_args={"auto_decompress": False} if self.raw_bodies else None,
        )
        m = "/v2/models/{model}"
        app.router.add_get("/v2/health/live", self._ok)
        app.router.add_get("/v2/health/ready", self._ok)
        app.router.add_get("/v2", self._server_metadata)
        app.router.add_get(m, self._metadata)
        app.router.add_get(m + "/ready", self._ok)
        app.router.add_post(m + "/infer", self._infer)
        app.router.add_post("/_fault", self._set_fault)
        app.router.add_post("/_release", self._release_handler)
        app.router.add_get("/_stats", self._stats)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        # Wake held/hanging calls so the server's graceful stop never waits on them.
        self._closing.set()
        self._release.set()

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "test-upstream",
                "version": "0",
                "extensions": ["binary_tensor_data"] if self.binary_extension else [],
            }
        )

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    def _check_model(self, request: web.Request) -> web.Response | None:
        if request.match_info["model"] not in (self.model.name, ECHO):
            return web.Response(
                status=404, body=error_body(f"unknown model {request.match_info['model']!r}")
            )
        return None

    async def _metadata(self, request: web.Request) -> web.Response:
        if self.hold_metadata:
            await self._release.wait()
        if request.match_info["model"] == ECHO:
            meta = {
                "name": ECHO,
                "versions": ["1"],
                "platform": "echo",
                "inputs": [],
                "outputs": [],
            }
            return web.json_response(meta)
        return self._check_model(request) or web.json_response(self.model.metadata())

    async def _set_fault(self, request: web.Request) -> web.Response:
        try:
            self.set_fault(Fault(**(await request.json())))
        except (TypeError, ValueError) as exc:
            return web.Response(status=400, body=error_body(str(exc)))
        return web.json_response(asdict(self.fault))

    async def _release_handler(self, request: web.Request) -> web.Response:
        self.release()
        return web.json_response({"released": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({**asdict(self.stats), "in_flight": self.stats.in_flight})

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        missing = self._check_model(request)
        if missing is not None:
            return missing
        body = await request.read()
        if self.raw_bodies:
            self.received.append((dict(request.headers), body))
            coding = request.headers.get("Content-Encoding", "identity").strip().lower()
            try:
                body = _decoded(body, coding)
            except zlib.error as exc:
                return web.Response(status=400, body=error_body(f"bad {coding} body: {exc}"))
            except KeyError:
                return web.Response(status=415, body=error_body(f"unsupported {coding!r}"))
        try:
            # Like Triton (rapidjson with NaN/Inf parsing on): a bare Infinity is accepted.
            parsed = parse_infer_request(
                body, request.headers.get(HEADER_LENGTH), allow_nonfinite=("*",)
            )
            self.seen.append(
                (dict(request.headers), parsed.output_names(), HEADER_LENGTH in request.headers)
            )
            if request.match_info["model"] == ECHO:
                return self._echo(parsed)
            x = parsed.inputs[self.model.input_name]
        except Exception as exc:
            message = getattr(exc, "message", None) or f"missing input {exc}"
            return web.Response(status=400, body=error_body(message))
        rid = parsed.id or "-"
        self.stats.started += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        self.events.append(("start", rid))
        await self._notify()
        try:
            return await self._answer(request, parsed, x)
        finally:
            self.stats.finished += 1
            self.events.append(("finish", rid))
            await self._notify()

    def _echo(self, parsed: Any) -> web.Response:
        payload, header_length = encode_infer_response(
            parsed.inputs, model_name=ECHO, request_id=parsed.id, request=parsed
        )
        headers = {} if header_length is None else {HEADER_LENGTH: str(header_length)}
        return web.Response(body=payload, headers=headers)

    async def _answer(self, request: web.Request, parsed: Any, x: np.ndarray) -> web.StreamResponse:
        fault = self.fault
        mode = fault.mode
        if mode != "normal" and fault.rate < 1.0 and self._rng.random() >= fault.rate:
            mode = "normal"
        if mode != "normal":
            self.stats.faulted += 1
        if mode == "slow":
            await asyncio.sleep(fault.delay_s)
        elif mode == "hold":
            await self._release.wait()
        elif mode == "hang":
            await self._closing.wait()
            return web.Response(status=503, body=error_body("upstream shutting down"))
        elif mode == "error":
            return web.Response(status=fault.status, body=error_body(fault.message))
        elif mode == "non_json":
            return web.Response(status=200, text="<html>upstream error page</html>")
        outputs = self.model.predict(x)
        if mode == "nan":
            outputs[self.model.output_name] = np.full_like(outputs[self.model.output_name], np.nan)
        elif mode == "wrong_rows":
            probs = outputs[self.model.output_name]
            outputs[self.model.output_name] = np.concatenate([probs, probs[:1]])
        payload, header_length = encode_infer_response(
            outputs,
            model_name=self.model.name,
            model_version="1",
            request_id=parsed.id,
            request=parsed,
        )
        if mode == "garbage":
            cut = header_length if header_length is not None else len(payload)
            doc = json.loads(payload[:cut])
            doc["outputs"][0]["shape"] = [7, 7, 7]  # disagrees with the data sent
            head = json.dumps(doc).encode()
            payload = head + payload[cut:]
            header_length = len(head) if header_length is not None else None
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        if mode == "crash":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_length = len(payload) + 1000
            await resp.prepare(request)
            await resp.write(payload[: max(1, len(payload) // 2)])
            if request.transport is not None:
                request.transport.close()
            return resp
        return web.Response(body=payload, headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description="test V2 upstream with fault injection")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="model")
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()

    async def run() -> None:
        upstream = Upstream(
            UpstreamModel(args.features, args.classes, args.seed, name=args.model),
            Fault(args.mode, delay_s=args.delay_s),
        )
        runner = web.AppRunner(upstream.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"upstream: listening on http://{host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
