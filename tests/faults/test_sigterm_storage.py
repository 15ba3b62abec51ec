"""SIGTERM under load with storage on: no accepted live request fails, every pair lands.

``mirrorgate serve`` is a real child process recording to SQLite; the upstreams are real
V2 servers in this process. Each request uses its own connection, so a refused
connection is a request the proxy never accepted, while any HTTP answer is an accepted
one. Some requests are parked inside the champion when the signal arrives: they must
still be answered 200 and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from storage.db import Database
from storage.store import Store
from tests.faults.helpers import body, own_upstream, ready, start_serve, stop, until

WORKERS = 6


class Load:
    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: list[int] = []
        self.answered: list[str] = []
        self.errors: list[str] = []
        self.refused = 0
        self.running = True
        self._n = 0

    async def worker(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while self.running:
                self._n += 1
                i = self._n
                try:
                    async with session.post(
                        f"{self.base}/v2/models/classifier/infer", json=body(i)
                    ) as resp:
                        text = await resp.read()
                        self.statuses.append(resp.status)
                        if resp.status == 200:
                            assert json.loads(text)["id"] == f"r{i}"
                            self.answered.append(f"r{i}")
                        else:
                            self.errors.append(f"{resp.status}: {text[:300]!r}")
                except aiohttp.ClientConnectorError:
                    # Listener closed: never accepted. Stop: the freed port may be
                    # another process's by now.
                    self.refused += 1
                    self.running = False
                except aiohttp.ClientError as exc:
                    self.errors.append(repr(exc))


async def refused(base: str) -> bool:
    """True once the listener is closed. A probe caught in the shutdown (accepted into
    the kernel's backlog, then reset or left unanswered) is "not yet", never a hang."""
    timeout = aiohttp.ClientTimeout(total=2)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{base}/v2/health/live"):
                return False
    except aiohttp.ClientConnectorError:
        return True
    except (aiohttp.ClientError, TimeoutError):
        return False


async def test_sigterm_under_load_records_every_accepted_pair(tmp_path: Path) -> None:
    champion = await own_upstream(seed=1)
    candidate = await own_upstream(seed=2)
    db_path = tmp_path / "pairs.sqlite"

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    config = {
        "server": {"model_name": "classifier", "shutdown_timeout_s": 60, "drain_delay_s": 0},
        "models": {
            "champion": model("champion", champion.url),
            "candidate": model("c", candidate.url),
        },
        "mirror": {"timeout_ms": 60000},
        "storage": {"url": f"sqlite:///{db_path}", "flush_interval_ms": 50},
    }
    proc, base = await start_serve(config, tmp_path)
    load = Load(base)
    workers: list[asyncio.Task[None]] = []
    try:
        await until(lambda: ready(base), "proxy ready")
        workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
        await until(lambda: len(load.statuses) >= 40, "40 answers")
        champion.upstream.set_fault("hold")
        await until(lambda: champion.upstream.stats.in_flight == WORKERS, "requests parked")
        proc.send_signal(signal.SIGTERM)
        await until(lambda: refused(base), "listener closed")
        assert proc.returncode is None  # still finishing the parked requests
        champion.upstream.release()
        code = await asyncio.wait_for(proc.wait(), 120)
    finally:
        load.running = False
        for task in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        stderr = await stop(proc)
        await champion.close()
        await candidate.close()
    assert code == 0, stderr
    assert set(load.statuses) == {200}, (load.errors, stderr)
    answered = set(load.answered)
    assert len(answered) == len(load.statuses) >= 40 + WORKERS

    db = Database(f"sqlite:///{db_path}")
    try:
        store = Store(db)
        rollouts = store.list_rollouts()
        assert len(rollouts) == 1
        pairs = list(store.iter_pairs(rollouts[0].id))
    finally:
        db.dispose()
    assert {p.id for p in pairs} == answered and len(pairs) == len(answered)
    assert all(p.champion.error is None and p.candidate.error is None for p in pairs)
