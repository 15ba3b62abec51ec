"""``mirrorgate serve`` child processes for the replica tests (real processes on loopback).

Shared by tests/replicas/test_replicas.py (kills and restarts) and
tests/replicas/test_one_proxy_vs_replicas.py (one proxy against three replicas).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    url: str


async def start_serve(name: str, config: Path) -> Replica:
    """Start ``mirrorgate serve`` on a free port; ``name`` is its replica id (ignored
    when replicas are off) and the name of its log next to the configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env.update(PYTHONPATH=str(ROOT), MIRRORGATE_REPLICAS__REPLICA_ID=name)
    # the replica's log, shown when the test fails (the child keeps its own descriptor)
    log = os.open(config.parent / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        cwd=config.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    os.close(log)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    assert line.startswith("mirrorgate: listening on "), line
    return Replica(name, proc, line.split()[-1])


async def until(predicate: Any, what: str, timeout_s: float = 90.0, pause_s: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy (a generous deadline:
    the machine is shared; the deadline only turns a hang into a failure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(pause_s)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def ready(session: aiohttp.ClientSession, replica: Replica) -> bool:
    try:
        async with session.get(f"{replica.url}/v2/health/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def print_logs(directory: Path, replicas: list[Replica]) -> None:
    """The processes' own logs, for the failure report."""
    for r in replicas:
        log = directory / f"{r.name}.log"
        if log.exists():
            print(f"--- {r.name} ---\n{log.read_text(errors='replace')[-4000:]}")


async def stop_all(replicas: list[Replica]) -> None:
    """SIGTERM to every live process, SIGKILL to any that does not stop in 30 s."""
    for r in replicas:
        if r.proc.returncode is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in replicas:
        try:
            await asyncio.wait_for(r.proc.wait(), 30)
        except TimeoutError:
            r.proc.kill()
            await r.proc.wait()
