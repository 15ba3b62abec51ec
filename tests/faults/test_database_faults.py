"""The database goes away mid-run and comes back: serving continues, drops are counted,
recording resumes.

The real proxy app with storage on (``create_app(storage=True)``, as ``serve`` runs it) in
front of real V2 upstreams. SQLite is "down" while another connection holds its write
lock (``BEGIN IMMEDIATE``: every write of the recorder waits, then fails and retries);
PostgreSQL is really stopped and started again (a throwaway cluster,
tests/support/postgres.py). The recorder's buffer is small here so the outage overflows
it with a few dozen requests.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.store import Store
from tests.faults.helpers import body, until
from tests.proxy.conftest import make_config
from tests.support.postgres import PostgresServer, PostgresUnavailable

BUFFER = 20
REQUIRE = os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresServer]:
    """A cluster of its own: this module stops it, which must not hit other tests."""
    try:
        server = PostgresServer()
        server.init()
        server.start()
    except PostgresUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"MIRRORGATE_REQUIRE_SERVICES=1 but PostgreSQL is unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable, PostgreSQL tests skipped: {exc}")
    try:
        yield server
    finally:
        server.destroy()


class SqliteOutage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    async def down(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.conn.execute("BEGIN IMMEDIATE")  # holds the write lock until up()

    async def up(self) -> None:
        assert self.conn is not None
        self.conn.execute("ROLLBACK")
        self.conn.close()
        self.conn = None


class PostgresOutage:
    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    async def down(self) -> None:
        # pg_ctl blocks: off the event loop, which is also the proxy's.
        await asyncio.to_thread(self.server.stop, "immediate")

    async def up(self) -> None:
        await asyncio.to_thread(self.server.start)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outage_and_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, str]:
    if request.param == "sqlite":
        path = tmp_path / "mirrorgate.sqlite"
        return SqliteOutage(path), f"sqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("pg_cluster")
    name = f"faults_{os.getpid()}_{len(request.node.name)}"
    server.drop_database(name)
    return PostgresOutage(server), server.create_database(name)


async def _infer_ok(proxy: Any, i: int) -> None:
    resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
    assert resp.status == 200, await resp.text()


async def test_database_down_and_back(
    start_upstream: Any, start_proxy: Any, outage_and_url: tuple[Any, str]
) -> None:
    outage, url = outage_and_url
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = make_config(
        champion.url,
        candidate.url,
        storage={
            "url": url,
            "buffer_size": BUFFER,
            "batch_size": 5,
            "flush_interval_ms": 20,
            "retry_initial_ms": 20,
            "retry_max_ms": 200,
            "close_timeout_s": 30,
        },
    )
    proxy = await start_proxy(config, storage=True)
    persistence = proxy.state.persistence
    assert persistence is not None and persistence.recorder is not None
    recorder = persistence.recorder
    store = Store(persistence.db)
    rollout_id = persistence.rollout_id

    def written() -> float:
        return proxy.metric("mirrorgate_recorder_written_total")

    def dropped() -> float:
        return proxy.metric("mirrorgate_recorder_dropped_total", reason="buffer_full")

    for i in range(10):
        await _infer_ok(proxy, i)
    await until(lambda: written() == 10, "10 pairs written")

    await outage.down()
    try:
        # Serving goes on while nothing can be written: every request answered.
        for i in range(100, 100 + 3 * BUFFER):
            await _infer_ok(proxy, i)
        await until(lambda: len(proxy.sink.records) == 10 + 3 * BUFFER, "every pair made")
        await until(lambda: dropped() > 0, "drops counted")
        # at most the buffer (plus the batch the writer holds) waits; the rest is dropped
        assert dropped() >= 3 * BUFFER - BUFFER - 5
    finally:
        await outage.up()

    # Back: what waited lands, and new records land again.
    assert await recorder.flush(timeout_s=60)
    before = written()
    assert before + dropped() == 10 + 3 * BUFFER
    for i in range(1000, 1010):
        await _infer_ok(proxy, i)
    total = 10 + 3 * BUFFER + 10
    await until(lambda: len(proxy.sink.records) == total, "every pair made")
    assert await recorder.flush(timeout_s=60)
    assert written() + dropped() == total
    assert written() == before + 10
    count = await asyncio.to_thread(store.count_pairs, rollout_id)
    assert count == written()
    landed = {r.id for r in await asyncio.to_thread(lambda: list(store.iter_pairs(rollout_id)))}
    assert {f"r{i}" for i in range(1000, 1010)} <= landed
    assert {f"r{i}" for i in range(10)} <= landed
