"""Drive a traffic scenario through a running proxy over HTTP: infer requests and feedback.

The client side of the demo: walks :meth:`proxy.demo.traffic.Traffic.events`, POSTs each
request to ``/v2/models/{model}/infer`` (Open Inference Protocol JSON, slice and request-id
headers) with at most ``concurrency`` in flight, and each label batch to
``/v1/feedback`` (bearer token) once every request the batch refers to has been answered,
without holding up the requests behind it. Optionally paced on the scenario's clock;
``should_stop`` lets the caller end early (for example once the verdict is final).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.demo.traffic import DemoRequest, LabelBatch, Traffic


@dataclass(slots=True)
class DriveStats:
    """What was sent and what came back; ``responses`` counts infer replies by status."""

    requests: int = 0
    rows: int = 0
    responses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    feedback_posts: int = 0
    labels: int = 0
    feedback_responses: Counter[int] = field(default_factory=Counter)
    stopped_early: bool = False
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.responses.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "transport_errors": self.transport_errors,
            "feedback_posts": self.feedback_posts,
            "labels": self.labels,
            "feedback_responses": {str(k): v for k, v in sorted(self.feedback_responses.items())},
            "stopped_early": self.stopped_early,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _forget(
    in_flight: dict[int, asyncio.Task[None]], seq: int
) -> Callable[[asyncio.Task[None]], None]:
    def callback(_task: asyncio.Task[None]) -> None:
        in_flight.pop(seq, None)

    return callback


async def drive(
    traffic: Traffic,
    base_url: str,
    *,
    model: str,
    control_token: str | None = None,
    concurrency: int = 8,
    paced: bool = False,
    session: aiohttp.ClientSession | None = None,
    on_progress: Callable[[DriveStats], None] | None = None,
    progress_every: int = 200,
    should_stop: Callable[[], bool] | None = None,
    timeout_s: float = 30.0,
) -> DriveStats:
    """Send the whole scenario (or until ``should_stop()``); returns the counts."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    base = base_url.rstrip("/")
    infer_url = f"{base}/v2/models/{model}/infer"
    feedback_url = f"{base}/v1/feedback"
    auth = {"Authorization": f"Bearer {control_token}"} if control_token else {}
    own = session is None
    client = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
    stats = DriveStats()
    slots = asyncio.Semaphore(concurrency)
    in_flight: dict[int, asyncio.Task[None]] = {}
    label_tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    wall = time.perf_counter()

    async def send(req: DemoRequest) -> None:
        try:
            async with client.post(infer_url, json=req.infer_body(), headers=req.headers) as resp:
                await resp.read()
                stats.responses[resp.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            stats.transport_errors += 1
        finally:
            slots.release()
            done = stats.answered + stats.transport_errors
            if on_progress is not None and done % progress_every == 0:
                on_progress(stats)

    async def post_labels(batch: LabelBatch, waits: list[asyncio.Task[None]]) -> None:
        # A label never overtakes its request: wait for the answers it refers to.
        if waits:
            await asyncio.wait(waits)
        try:
            body = batch.feedback_body()
            async with client.post(feedback_url, json=body, headers=auth) as resp:
                await resp.read()
                stats.feedback_responses[resp.status] += 1
                stats.feedback_posts += 1
                stats.labels += len(body)
        except (aiohttp.ClientError, TimeoutError):
            stats.transport_errors += 1

    def spawn_labels(batch: LabelBatch) -> None:
        waits = [task for seq, task in in_flight.items() if seq < batch.due_seq]
        task = asyncio.create_task(post_labels(batch, waits))
        label_tasks.add(task)
        task.add_done_callback(label_tasks.discard)

    try:
        for event in traffic.events():
            if paced:
                delay = start + event.t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if isinstance(event, LabelBatch):
                spawn_labels(event)
                continue
            await slots.acquire()
            # Asked once a slot is free, i.e. with the latest answers in.
            if should_stop is not None and should_stop():
                slots.release()
                stats.stopped_early = True
                break
            task = asyncio.create_task(send(event))
            in_flight[event.seq] = task
            task.add_done_callback(_forget(in_flight, event.seq))
            stats.requests += 1
            stats.rows += len(event.pool_rows)
        pending = [*in_flight.values(), *label_tasks]
        if pending:
            await asyncio.wait(pending)
    finally:
        for task in [*in_flight.values(), *label_tasks]:
            task.cancel()
        if own:
            await client.close()
        stats.elapsed_s = time.perf_counter() - wall
    return stats
