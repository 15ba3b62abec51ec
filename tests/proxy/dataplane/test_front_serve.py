"""``mirrorgate serve`` with the byte-level front, a candidate and two live processes:
every answered request's pair reaches the shadow worker's sink, as on the aiohttp path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.helpers import body, ready, until
from tests.proxy.conftest import LIVE_PATHS

ROOT = Path(__file__).resolve().parents[3]
N = 40


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (the kernel's table: /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            count += 1
    return count


async def _champion_calls(base: str, n: int) -> bool:
    """Whether one scrape of /metrics counts ``n`` answered champion calls."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mirrorgate_proxy_requests_total" and sample.labels == {
                "role": "champion",
                "code": "200",
            }:
                return sample.value == n
    return False


def _model(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}


@pytest.mark.parametrize("live_path", LIVE_PATHS)
async def test_two_live_processes_hand_every_pair_to_the_worker(
    start_upstream: Any, tmp_path: Path, live_path: str
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = {
        "server": {"model_name": "classifier", "workers": 2, "live_path": live_path},
        "models": {
            "champion": _model("champion", champion.url),
            "candidate": _model("candidate", candidate.url),
        },
        "mirror": {"shadow_after_abort": True},
        "shadow": {"process": True},
        "storage": {"url": f"sqlite:///{tmp_path / 'pairs.sqlite'}"},
    }
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(yaml.safe_dump(config))
    pairs = tmp_path / "pairs.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        "--pairs-out",
        str(pairs),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("mirrorgate: listening on "):
            assert proc.stderr is not None
            raise AssertionError((await proc.stderr.read()).decode()[-3000:])
        base = line.split()[-1]
        await until(lambda: ready(base), "proxy ready")
        # The second live process binds the port a little after the first: requests go
        # to both only once both listen (SO_REUSEPORT: one listening socket each).
        port = int(base.rsplit(":", 1)[1])
        await until(lambda: _listeners(port) == 2, "both live processes listening")
        ids = set()
        for i in range(N):  # a connection each: the kernel spreads them over both
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{base}/v2/models/classifier/infer", json=body(i)) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["X-Request-Id"] == f"r{i}"
                    ids.add(f"r{i}")
        # A scrape reaches either live process; both answer with every live process's
        # counters (pushed to the worker): all N champion calls, whichever answers.
        await until(lambda: _champion_calls(base, N), f"{N} champion calls in /metrics", tries=1000)
        for _ in range(8):  # a connection each, as a Prometheus scrape
            assert await _champion_calls(base, N)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert {r["id"] for r in records} == ids and len(records) == N
    assert all(r["champion"].get("error") is None for r in records)
    assert all(r["candidate"].get("error") is None for r in records)
