"""``python -m proxy serve`` as a subprocess: start, serve, SIGTERM under load, drain.

The champion and candidate are real V2 upstreams in this test process; the proxy is a
real child process. Requests use one connection each, so a connection refused after the
listener closed is a request never accepted, while any HTTP answer is an accepted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from tests.proxy.conftest import N_FEATURES

ROOT = Path(__file__).resolve().parents[3]
WORKERS = 6


async def _start_proxy(config: dict[str, Any], tmp_path: Path, *extra: str) -> tuple[Any, str]:
    path = tmp_path / "mirrorgate.yaml"
    # serve records to storage: a throwaway database, never one in the source tree
    config = {"storage": {"url": f"sqlite:///{tmp_path / 'mirrorgate.sqlite'}"}, **config}
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("MIRRORGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        *extra,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    assert line.startswith("mirrorgate: listening on "), line
    return proc, line.split()[-1]


def _config(champion: str, candidate: str) -> dict[str, Any]:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    return {
        "server": {
            "host": "127.0.0.1",
            "model_name": "classifier",
            "shutdown_timeout_s": 60,
            "drain_delay_s": 120,  # ended by the second SIGTERM, not by the clock
        },
        "models": {
            "champion": model("champion", champion),
            "candidate": model("candidate", candidate),
        },
        "mirror": {"timeout_ms": 60000},
    }


def _body(i: int) -> dict[str, Any]:
    x = np.random.default_rng(i).normal(size=(1, N_FEATURES)).astype(np.float32)
    return {
        "id": f"r{i}",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, N_FEATURES], "data": x.ravel().tolist()}
        ],
    }


class Load:
    """WORKERS loops sending requests; every outcome is recorded.

    Once a connection is refused after ``closing`` is set, the workers stop: the freed
    port may be bound by another process on this shared machine, whose answers must not
    be counted as the proxy's.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: list[int] = []
        self.answered_ids: list[str] = []
        self.refused = 0
        self.other_errors: list[str] = []
        self.running = True
        self.closing = False
        self._n = 0

    async def worker(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while self.running:
                self._n += 1
                i = self._n
                try:
                    async with session.post(
                        f"{self.base}/v2/models/classifier/infer", json=_body(i)
                    ) as resp:
                        body = await resp.read()
                        self.statuses.append(resp.status)
                        if resp.status == 200:
                            assert json.loads(body)["id"] == f"r{i}"
                            self.answered_ids.append(f"r{i}")
                        else:
                            self.other_errors.append(f"{resp.status}: {body[:300]!r}")
                except aiohttp.ClientConnectorError:
                    self.refused += 1  # listener closed: never accepted
                    if self.closing:
                        self.running = False
                    await asyncio.sleep(0.02)
                except aiohttp.ClientError as exc:  # e.g. reset in the kernel backlog
                    self.other_errors.append(repr(exc))
                    await asyncio.sleep(0.02)


async def _ready_status(base: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v2/health/ready") as resp:
            return resp.status


async def _refuses(base: str) -> bool:
    try:
        await _ready_status(base)
    except aiohttp.ClientConnectorError:
        return True
    return False


async def _until(predicate: Any, what: str, tries: int = 3000) -> None:
    for _ in range(tries):
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for: {what}")


async def test_sigterm_under_load_loses_no_accepted_request(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    pairs = tmp_path / "pairs.jsonl"
    proc, base = await _start_proxy(
        _config(champion.url, candidate.url), tmp_path, "--pairs-out", str(pairs)
    )
    load = Load(base)
    workers: list[asyncio.Task[None]] = []
    try:
        await _until(lambda: _ready_status_is(base, 200), "proxy ready")
        workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
        await _until(lambda: len(load.statuses) >= 30, "30 answers")

        # 1st SIGTERM: readiness 400 (Triton's not-ready) while it still serves.
        proc.send_signal(signal.SIGTERM)
        await _until(lambda: _ready_status_is(base, 400), "readiness 400")
        served_before = len(load.statuses)
        await _until(lambda: len(load.statuses) >= served_before + 10, "serving while not ready")

        # Park every worker's request inside the champion, then stop for real.
        champion.upstream.set_fault("hold")
        await _until(lambda: champion.upstream.stats.in_flight == WORKERS, "all requests parked")
        load.closing = True
        proc.send_signal(signal.SIGTERM)
        await _until(lambda: _refuses(base), "listener closed")
        assert proc.returncode is None  # still finishing the parked requests
        champion.upstream.release()
        code = await asyncio.wait_for(proc.wait(), 120)
    finally:
        load.running = False
        for task in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert code == 0, stderr
    # Every request that reached the proxy was answered 200, including the parked ones,
    # and every champion call belongs to one of those answers.
    assert set(load.statuses) == {200}, (load.other_errors, stderr[-3000:])
    answered = set(load.answered_ids)
    assert len(answered) == len(load.statuses)
    assert champion.upstream.stats.started == len(answered)
    assert champion.upstream.stats.finished == len(answered)
    assert load.refused > 0
    # Every answered request was mirrored, and the sink flushed all of them at exit.
    lines = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert {r["id"] for r in lines} == answered and len(lines) == len(answered)
    assert {rid for kind, rid in candidate.upstream.events if kind == "finish"} == answered
    assert all(r["champion"]["error"] is None and r["candidate"]["error"] is None for r in lines)
    assert "stopping: no new connections" in stderr


async def _ready_status_is(base: str, status: int) -> bool:
    try:
        return await _ready_status(base) == status
    except aiohttp.ClientError:
        return False


async def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models: {champion: {name: c, kind: onnx}}\nmirror: {sampel_rate: 1}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    text = err.decode()
    assert "mirror.sampel_rate: unknown key" in text and "models.champion" in text


async def test_unreachable_upstream_exits_2(tmp_path: Path) -> None:
    config = _config("http://127.0.0.1:9", "http://127.0.0.1:9")
    proc, _ = await _start_proxy(config, tmp_path)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "unreachable" in err.decode()
