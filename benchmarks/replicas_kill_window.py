"""What a SIGKILL of a replica loses: acknowledged labels (none, by design) and answered
pairs still in the recorder's buffer (the documented window, ``storage.flush_interval_ms``).

One ``mirrorgate serve`` replica process (``replicas.enabled``, the demo's real ONNX
models) on a throwaway PostgreSQL; demo traffic at a fixed concurrency, labels posted
as the scenario schedules them; after ``--kill-after`` requests the process is
SIGKILLed mid-traffic. Counted afterwards in the database: rows answered 200 vs pair
rows stored, labels answered 202 vs label rows stored.

Run from the repository root:
    PYTHONPATH=. python benchmarks/replicas_kill_window.py [--kill-after 300 --runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from sqlalchemy import text

from proxy.demo.traffic import DemoRequest, LabelBatch, Traffic, scenario
from storage.db import Database
from tests.replicas.test_replicas import AUTH, _config, _ready, _start, _until
from tests.support.postgres import PostgresServer


async def one_run(url: str, path: Path, kill_after: int, seed: int) -> dict[str, Any]:
    replica = await _start("k0", path)
    answered = acked = 0
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        await _until(lambda: _ready(session, replica), "ready", 120)
        traffic = Traffic(scenario("fast", seed=seed, id_prefix=f"k{seed}"))
        slots = asyncio.Semaphore(8)
        tasks: list[asyncio.Task[None]] = []

        async def request(req: DemoRequest) -> None:
            nonlocal answered
            async with slots:
                try:
                    async with session.post(
                        f"{replica.url}/v2/models/digits/infer",
                        json=req.infer_body(),
                        headers=req.headers,
                    ) as resp:
                        if resp.status == 200:
                            answered += len(req.pool_rows)
                except aiohttp.ClientError:
                    pass

        sent = 0
        for ev in traffic.events():
            if isinstance(ev, LabelBatch):
                body = [lab.feedback() for lab in ev.labels]
                try:
                    async with session.post(
                        f"{replica.url}/v1/feedback", json=body, headers=AUTH
                    ) as resp:
                        if resp.status == 202:
                            acked += len(body)
                except aiohttp.ClientError:
                    pass
                continue
            if sent == kill_after:
                replica.proc.send_signal(signal.SIGKILL)  # mid-traffic: requests in flight
                break
            tasks.append(asyncio.create_task(request(ev)))
            ids.append(ev.id)
            sent += 1
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, return_exceptions=True)
        await replica.proc.wait()
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            pairs = int(conn.execute(text("SELECT count(*) FROM pairs")).scalar() or 0)
            labels = int(conn.execute(text("SELECT count(*) FROM labels")).scalar() or 0)
    finally:
        db.dispose()
    return {
        "rows_answered": answered,
        "pair_rows_stored": pairs,
        "pair_rows_lost": answered - pairs,
        "labels_acknowledged": acked,
        "labels_stored": labels,
        "labels_lost": acked - labels,
        "flush_interval_ms": _config(url)["storage"]["flush_interval_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=300, help="requests before the kill")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            url = pg.create_database(f"kill{run}")
            path = Path(tmp) / f"{run}.yaml"
            path.write_text(yaml.safe_dump(_config(url)))
            res = asyncio.run(one_run(url, path, args.kill_after, seed=run + 1))
            print(json.dumps(res))


if __name__ == "__main__":
    main()
