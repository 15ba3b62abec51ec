"""``server.control_port`` with the shadow worker (split mode, the default for a remote
candidate): the serving process binds the control listener, forwards /v1 to the worker
and merges /metrics; the data port serves neither.

Real ``python -m proxy serve`` child (and its worker process), real V2 upstreams.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

from tests.faults.helpers import until
from tests.proxy.shadow.test_worker import (
    AUTH,
    _finished,
    _infer,
    _serve,
    drained,
    metric_values,
)

METRICS_TOKEN = "metrics-only-token"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


async def _metrics(session: aiohttp.ClientSession, control: str) -> dict[str, float]:
    async with session.get(f"{control}/metrics", headers=METRICS_AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return metric_values(await resp.text())


async def _idle(session: aiohttp.ClientSession, control: str) -> bool:
    return drained(await _metrics(session, control))


async def test_control_port_in_split_mode_forwards_v1_merges_metrics_and_aborts(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    served = await _serve(
        tmp_path,
        champion.url,
        candidate.url,
        # shadow.process left at its default (auto): a remote candidate means the worker
        server={
            "host": "127.0.0.1",
            "model_name": "classifier",
            "control_token": AUTH["Authorization"].split()[-1],
            "control_port": 0,
            "metrics_token": METRICS_TOKEN,
            "shutdown_timeout_s": 60,
        },
        shadow={"worker_nice": 5},
    )
    try:
        (worker,) = served.worker_pids()  # split mode: a worker process was started
        assert worker != served.proc.pid
        # shadow.worker_nice: 5 (below): the worker runs below the live process's priority
        live_nice = os.getpriority(os.PRIO_PROCESS, served.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, worker) == min(19, live_nice + 5)
        assert served.proc.stdout is not None
        line = (await asyncio.wait_for(served.proc.stdout.readline(), 60)).decode()
        assert line.startswith("mirrorgate: control plane on "), line
        control = line.split()[-1]
        assert control != served.base

        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/v1/rollout", "/v1/rollout/verdict"):
                async with session.get(served.base + path, headers=AUTH) as resp:
                    assert resp.status == 404, path  # not on the data port

            # /metrics: its own token (checked here and by the worker)
            async with session.get(control + "/metrics") as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with session.get(control + "/metrics", headers=AUTH) as resp:
                assert resp.status == 401  # the control token is not the metrics token
            # /v1: the control token, checked by the worker's control plane
            async with session.get(control + "/v1/rollout") as resp:
                assert resp.status == 401
            async with session.get(control + "/v1/rollout", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
                assert "stage" in await resp.json()

            for i in range(10):
                await _infer(session, served.base, i)
            ids = {f"r{i}" for i in range(10)}
            await until(lambda: _finished(candidate.upstream) >= ids, "10 candidate calls")

            async def candidate_counted() -> bool:
                m = await _metrics(session, control)
                return m.get('mirrorgate_proxy_requests_total{code="200",role="candidate"}') == 10

            # merged: the live process's champion calls and the worker's candidate calls
            await until(candidate_counted, "the worker's candidate calls in /metrics")
            m = await _metrics(session, control)
            assert m['mirrorgate_proxy_requests_total{code="200",role="champion"}'] == 10
            assert m["mirrorgate_shadow_handoff_taken_total"] == 10

            # abort through the control port reaches the worker's rollout ...
            async with session.post(
                control + "/v1/rollout/abort",
                json={"who": "test", "why": "stop the candidate"},
                headers=AUTH,
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["verdict"] == "abort"
            async with session.get(control + "/v1/rollout/verdict", headers=AUTH) as resp:
                assert resp.status == 200
                assert (await resp.json())["verdict"] == "abort"

            # ... and the live process: the worker's state frame reaches it
            # asynchronously; once it has, every request counts a candidate_stopped drop
            # there (nothing handed off). Jobs handed off before that are dropped by the
            # worker, which stopped first: the candidate gets no call after its queue
            # drained, mirrored or canary.
            stopped = 'mirrorgate_shadow_dropped_total{reason="candidate_stopped"}'
            await until(lambda: _idle(session, control), "worker idle")
            calls = len(candidate.upstream.events)
            sent = [10]

            async def live_side_stopped() -> bool:
                await _infer(session, served.base, sent[0])
                sent[0] += 1
                return (await _metrics(session, control)).get(stopped, 0) > 0

            await until(live_side_stopped, "the live process stops mirroring", tries=500)
            drops = (await _metrics(session, control))[stopped]
            for i in range(100, 110):
                await _infer(session, served.base, i)

            async def ten_more_dropped() -> bool:
                return (await _metrics(session, control))[stopped] == drops + 10

            await until(ten_more_dropped, "10 more candidate_stopped drops")
            await until(lambda: _idle(session, control), "worker idle")
            assert len(candidate.upstream.events) == calls
        assert await served.stop() == 0
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
