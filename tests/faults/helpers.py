"""Small helpers shared by the fault tests: V2 bodies, polling on conditions, RSS."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import Process
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import numpy as np
import yaml
from aiohttp import web

from tests.proxy.conftest import N_CLASSES, N_FEATURES
from tests.proxy.upstream import Upstream, UpstreamModel

TOKEN = "fault-suite-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def features(i: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(i).normal(size=(rows, N_FEATURES)).astype(np.float32)


def body(i: int, rows: int = 1) -> dict[str, Any]:
    x = features(i, rows)
    return {
        "id": f"r{i}",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
    }


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, tries: int = 3000
) -> None:
    """Poll every 20 ms; fail naming the condition (bounded: 60 s at most)."""
    for _ in range(tries):
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for: {what}")


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class OwnedUpstream:
    """A V2 upstream on a free loopback port that the test can stop (connection refused
    afterwards) — unlike the fixture's, whose lifetime pytest owns. ``close`` is
    idempotent; tests call it in ``finally``."""

    def __init__(self, upstream: Upstream, runner: web.AppRunner, url: str) -> None:
        self.upstream = upstream
        self.runner = runner
        self.url = url
        self._closed = False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.upstream.release()
            await self.runner.cleanup()


async def own_upstream(seed: int, **fault: Any) -> OwnedUpstream:
    upstream = Upstream(UpstreamModel(N_FEATURES, N_CLASSES, seed), seed=seed)
    if fault:
        upstream.set_fault(**fault)
    runner = web.AppRunner(upstream.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return OwnedUpstream(upstream, runner, f"http://{host}:{port}")


ROOT = Path(__file__).resolve().parents[2]


async def spawn_serve(
    config: dict[str, Any], tmp_path: Path, stderr_file: Path | int | None = None
) -> Process:
    """``python -m proxy serve`` on ``config`` as a child process on a free port (stdout
    piped; no ``MIRRORGATE_`` variables leak in from the test's environment). stderr is
    piped, or written to ``stderr_file`` for long runs: a pipe nobody reads fills at
    64 KiB and then blocks the serve process in its next log line (event loop and all),
    which is how benchmarks/fault_matrix.py used to wedge after its database phases. An
    ``int`` is a descriptor the child writes its stderr to (a pipe the test holds)."""
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    if isinstance(stderr_file, int):
        return await _exec(path, tmp_path, env, stderr_file)
    if stderr_file is not None:
        with log_file(stderr_file) as err:  # the child keeps its own descriptor
            return await _exec(path, tmp_path, env, err)
    return await _exec(path, tmp_path, env, asyncio.subprocess.PIPE)


async def _exec(path: Path, cwd: Path, env: dict[str, str], stderr: Any) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )


async def start_serve(
    config: dict[str, Any], tmp_path: Path, stderr_file: Path | None = None
) -> tuple[Process, str]:
    """``python -m proxy serve`` as a child process on a free port; returns (proc, base)."""
    proc = await spawn_serve(config, tmp_path, stderr_file)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("mirrorgate: listening on "):
        raise AssertionError(f"serve did not start: {line!r}\n{await stop(proc, stderr_file)}")
    return proc, line.split()[-1]


async def stop(proc: Process, stderr_file: Path | None = None) -> str:
    """Kill if still running; return stderr's tail (from the pipe or ``stderr_file``)."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    if stderr_file is not None:
        return tail(stderr_file)
    err = await proc.stderr.read() if proc.stderr else b""
    return err.decode(errors="replace")[-4000:]


def log_file(path: Path) -> BinaryIO:
    return open(path, "wb")


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file (a few KiB: read at failure or teardown only)."""
    return path.read_bytes().decode(errors="replace")[-chars:]


async def ready(base: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v2/health/ready") as resp:
                return resp.status == 200
    except aiohttp.ClientError:
        return False
