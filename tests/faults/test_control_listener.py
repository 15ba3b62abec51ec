"""``server.control_port``: the control plane and /metrics on their own listener.

A real ``mirrorgate serve`` process: the data port serves only the V2 routes (the
control routes and /metrics are 404 there), the control port serves /v1/... with the
control token and /metrics with its own token (401 + WWW-Authenticate without it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.faults.helpers import AUTH, TOKEN, ready, start_serve, stop, until

METRICS_TOKEN = "metrics-only-token"


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers or {}) as resp:
            return resp.status, await resp.text(), resp.headers


async def test_control_plane_and_metrics_live_on_their_own_listener(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    config = {
        "server": {
            "model_name": "classifier",
            "control_token": TOKEN,
            "control_port": 0,
            "metrics_token": METRICS_TOKEN,
        },
        "models": {
            "champion": model("champion", champion.url),
            "candidate": model("c", candidate.url),
        },
        "storage": {"url": "sqlite:///pairs.sqlite"},
    }
    proc, base = await start_serve(config, tmp_path)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("mirrorgate: control plane on "), line
        control = line.split()[-1]
        assert control != base
        await until(lambda: ready(base), "proxy ready")

        for path in ("/metrics", "/v1/rollout", "/v1/rollout/verdict"):
            status, _, _ = await _get(base + path, AUTH)
            assert status == 404, path  # not on the data port

        status, _, headers = await _get(control + "/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = await _get(control + "/metrics", AUTH)  # the control token is not it
        assert status == 401
        status, text, _ = await _get(
            control + "/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
        assert status == 200 and "mirrorgate_proxy_requests_total" in text

        status, text, _ = await _get(control + "/v1/rollout", AUTH)
        assert status == 200, text
        status, _, _ = await _get(control + "/v1/rollout")
        assert status == 401
    finally:
        await stop(proc)
