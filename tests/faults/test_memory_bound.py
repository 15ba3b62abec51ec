"""Memory stays bounded with a stalled candidate and a stalled database.

``mirrorgate serve`` (a child process) in front of a champion that echoes 64 KiB binary
tensors and a candidate that never answers (each mirrored call ends at
``mirror.timeout_ms`` as a failed pair), recording to a SQLite file whose write lock this
test holds the whole time (every write waits, fails, retries). Labels flow in for every
request, as they would in production. The traffic offered is many times what the
configured bounds allow to be held; the process's resident memory (``VmRSS``) must stay
within its level after warm-up plus what those bounds allow plus a fixed allowance for
the allocator — a bound computed from the configuration, never from a timing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request
from tests.faults.helpers import TOKEN, own_upstream, ready, rss_kib, start_serve, stop, until

COLUMNS = 16_384  # one FP32 row: 64 KiB per request
REQUEST_BYTES = COLUMNS * 4
REQUESTS = 1500
CONCURRENCY = 4
# The circuit breaker is off: this test is about the queues' bounds while every mirrored
# call waits out its timeout (with it on, the dead candidate would cost nothing).
MIRROR = {
    "max_in_flight": 4,
    "queue_size": 8,
    "max_queue_bytes": 1 << 20,
    "timeout_ms": 300,
    "circuit": {"enabled": False},
}
BUFFER = 50  # records waiting for the (stalled) database
ALLOWANCE_MIB = 32  # allocator slack, arenas, lazily imported code paths
WARMUP = 100
# What the bounds let the process hold, beyond its warm level: the mirror queue's bytes;
# each in-flight mirrored call and each live request (input and output, 2 copies each:
# wire bytes and array); each buffered record (input captured, the champion's output as
# float64 in the record, plus its encoded row: 2 + 4 + 4 = 10 x the request bytes).
HELD_BYTES = (
    MIRROR["max_queue_bytes"]
    + (MIRROR["max_in_flight"] + CONCURRENCY) * 4 * REQUEST_BYTES
    + BUFFER * 10 * REQUEST_BYTES
)
BOUND_KIB = (HELD_BYTES >> 10) + ALLOWANCE_MIB * 1024


class Stalled:
    """A V2 candidate that loads fine and then never answers an inference."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/health/ready", self._ok)
        app.router.add_get("/v2/health/live", self._ok)
        app.router.add_get("/v2/models/{model}", self._metadata)
        app.router.add_get("/v2/models/{model}/ready", self._ok)
        app.router.add_post("/v2/models/{model}/infer", self._hang)
        return app

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "echo", "versions": ["1"], "platform": "stalled", "inputs": [], "outputs": []}
        )

    async def _hang(self, request: web.Request) -> web.Response:
        await request.read()
        await self.closing.wait()
        return web.Response(status=503)


def _request(i: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(i).random((1, COLUMNS), dtype=np.float32)
    payload, header_length = encode_infer_request({"x": x}, request_id=f"r{i}", binary=True)
    return payload, {HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"}


async def test_rss_stays_within_the_configured_bounds(tmp_path: Path) -> None:
    champion = await own_upstream(seed=1)
    stalled = Stalled()
    runner = web.AppRunner(stalled.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    candidate_url = "http://{}:{}".format(*runner.addresses[0][:2])
    db_path = tmp_path / "stalled.sqlite"

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "echo", "timeout_ms": 30000}

    config = {
        "server": {"model_name": "echo", "control_token": TOKEN, "shutdown_timeout_s": 2},
        "models": {
            "champion": model("champion", champion.url),
            "candidate": model("c", candidate_url),
        },
        "mirror": MIRROR,
        "storage": {
            "url": f"sqlite:///{db_path}",
            "buffer_size": BUFFER,
            "batch_size": 10,
            "capture": "all",
            "retry_initial_ms": 50,
            "retry_max_ms": 500,
            "close_timeout_s": 1,
        },
    }
    proc, base = await start_serve(config, tmp_path)
    lock: sqlite3.Connection | None = None
    samples: list[int] = []
    try:
        await until(lambda: ready(base), "proxy ready")
        sent = 0
        answered = 0

        async with aiohttp.ClientSession() as session:

            async def worker(total: int) -> None:
                nonlocal sent, answered
                while sent < total:
                    i = sent
                    sent += 1
                    payload, headers = _request(i)
                    async with session.post(
                        f"{base}/v2/models/echo/infer", data=payload, headers=headers
                    ) as resp:
                        await resp.read()
                        assert resp.status == 200
                        answered += 1
                    if i % 50 == 49:
                        labels = [{"id": f"r{j}", "label": 1} for j in range(i - 49, i + 1)]
                        async with session.post(
                            f"{base}/v1/feedback",
                            json=labels,
                            headers={"Authorization": f"Bearer {TOKEN}"},
                        ) as resp:
                            await resp.read()  # 202, or 503 when the buffer is full
                    if i % 25 == 0:
                        samples.append(rss_kib(proc.pid))

            # Warm-up with a healthy database: code paths, pools and caches reach their
            # working size; then the database stalls for the rest of the run.
            await asyncio.gather(*(worker(WARMUP) for _ in range(CONCURRENCY)))
            baseline = rss_kib(proc.pid)
            samples.clear()
            lock = sqlite3.connect(db_path, isolation_level=None, timeout=30)
            lock.execute("BEGIN IMMEDIATE")  # held until the end: every write waits
            await asyncio.gather(*(worker(WARMUP + REQUESTS) for _ in range(CONCURRENCY)))
            async with session.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        samples.append(rss_kib(proc.pid))
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        stalled.closing.set()
        err = await stop(proc)
        await runner.cleanup()
        await champion.close()
    assert answered == WARMUP + REQUESTS, err
    # The run really pushed past every bound: far more bytes offered than may be held,
    # mirrored work dropped, mirrored calls timed out, records dropped at the buffer.
    assert 2 * REQUEST_BYTES * REQUESTS > 2 * (BOUND_KIB << 10)
    values = _samples(metrics)
    # A remote champion's mirrored work holds its raw request and answer bytes (about
    # twice the request), so the byte bound may be what drops first.
    dropped = [
        values.get(("mirrorgate_shadow_dropped_total", r), 0) for r in ("queue_full", "queue_bytes")
    ]
    assert sum(dropped) > 0
    assert values[("mirrorgate_shadow_failures_total", "timeout")] > 0
    assert values[("mirrorgate_recorder_dropped_total", "buffer_full")] > 0
    growth = max(samples) - baseline
    print(f"RSS baseline {baseline} KiB, growth {growth} KiB, bound {BOUND_KIB} KiB")
    assert growth <= BOUND_KIB, (baseline, samples, BOUND_KIB)


def _samples(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, sample.labels.get("reason", ""))] = sample.value
    return out
