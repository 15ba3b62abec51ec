"""``server.event_loop: uvloop``: a real ``mirrorgate serve`` whose live process and shadow
worker both run on uvloop (its extension mapped in each: ``/proc/<pid>/maps``, the
kernel's view), in front of a real V2 upstream: the client gets the champion's bytes on
both live paths (a plain body on the byte-level front, a gzip body through the decoding
path), and every pair reaches the store with the candidate's answer and latency (the
worker's raw candidate pool, whose kernel-stamped transport is driven by uvloop's
``add_reader`` here). The same test on asyncio, the default, shows the check can tell
them apart. Before, nothing ran serve on uvloop."""

from __future__ import annotations

import asyncio
import gzip
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request
from storage.db import Database
from storage.store import Store
from tests.faults.helpers import features, ready, start_serve, tail, until
from tests.proxy.cli.test_serve_affinity import WORKER_PID, _config

pytest.importorskip("uvloop")  # the dev extra installs it
pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")

N = 12


def _uses_uvloop(pid: int) -> bool:
    """Whether uvloop's compiled loop is loaded in ``pid``."""
    return re.search(r"/uvloop/loop\.[^/]*\.so", Path(f"/proc/{pid}/maps").read_text()) is not None


def _request(i: int) -> tuple[bytes, dict[str, str]]:
    body, header_length = encode_infer_request({"x": features(i)}, request_id=f"r{i}")
    headers = {HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"}
    if i % 2:  # every other one gzip-coded: the live path that decodes to read the id
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return body, headers


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_its_event_loop_and_passes_the_champion_through(
    start_upstream: Any, tmp_path: Path, event_loop: str
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    config = _config(champion.url, candidate.url, tmp_path, server={"event_loop": event_loop})
    log = tmp_path / "serve.stderr"
    proc, base = await start_serve(config, tmp_path, log)
    try:
        await until(lambda: ready(base), "proxy ready")
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for i in range(N):
                body, headers = _request(i)
                async with session.post(
                    f"{champion.url}/v2/models/model/infer", data=body, headers=headers
                ) as resp:
                    direct = await resp.read()
                async with session.post(
                    f"{base}/v2/models/classifier/infer", data=body, headers=headers
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    assert await resp.read() == direct
                    assert resp.headers["X-Mirrorgate-Served-By"] == "champion"
        found = WORKER_PID.search(log.read_text(errors="replace"))
        assert found is not None, tail(log)
        worker = int(found[1])
        # uvloop is imported only to run on it: the asyncio case shows the check can fail
        on_uvloop = event_loop == "uvloop"
        assert _uses_uvloop(proc.pid) is on_uvloop and _uses_uvloop(worker) is on_uvloop
        proc.terminate()  # drains: every handed-off pair is recorded before exit
        assert await asyncio.wait_for(proc.wait(), 120) == 0, tail(log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    store = Store(Database(config["storage"]["url"]))
    for i in range(N):
        (pair,) = store.get_pairs(f"r{i}")
        assert pair.champion.error is None and pair.candidate.error is None
        assert pair.candidate.output is not None and pair.candidate.latency_ms is not None
        assert pair.candidate.latency_ms > 0
