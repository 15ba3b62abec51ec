"""``mirrorgate serve`` takes its start-up heap out of the collector's full passes
(proxy/core/heap.py), in-process and with the shadow worker, and still serves.

A full GC pass stops every thread of the process while it traverses the heap; the fault
matrix caught 100-350 ms passes of serve in its slowest requests (docs/faults.md). The
freeze is visible only inside the process, so the test reads the lines serve logs
when it freezes: the counts it reports are ``gc.get_freeze_count()`` at that moment.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.helpers import start_serve
from tests.proxy.cli.test_serve import _body, _ready_status_is, _until

FROZEN = re.compile(r"INFO proxy\.core\.heap(?:\[\w+\])?: (.+?): (\d+) objects frozen")


@pytest.mark.parametrize("shadow_process", [False, True], ids=["in-process", "worker"])
async def test_serve_freezes_its_start_up_heap_and_serves(
    start_upstream: Any, tmp_path: Path, shadow_process: bool
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    config = {
        "server": {"host": "127.0.0.1", "model_name": "classifier"},
        "models": {
            "champion": model("champion", champion.url),
            "candidate": model("candidate", candidate.url),
        },
        "storage": {"url": f"sqlite:///{tmp_path / 'mirrorgate.sqlite'}"},
        "shadow": {"process": shadow_process},
    }
    log = tmp_path / "serve.stderr"  # a file: nobody reads a pipe while serve runs
    proc, base = await start_serve(config, tmp_path, log)
    try:
        await _until(lambda: _ready_status_is(base, 200), "proxy ready")
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                async with session.post(
                    f"{base}/v2/models/classifier/infer", json=_body(i)
                ) as resp:
                    assert resp.status == 200, await resp.text()
        # The worker logs its freeze just before it says it is ready (and readiness
        # waits for it); poll the file for the lines rather than assume their timing.
        wanted = {"serve started", "models loaded"} | (
            {"shadow worker loaded"} if shadow_process else set()
        )

        def frozen() -> dict[str, int]:
            return {m[1]: int(m[2]) for m in FROZEN.finditer(log.read_text(errors="replace"))}

        await _until(lambda: wanted <= set(frozen()), f"freeze lines {sorted(wanted)}")
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
    counts = frozen()
    # Modules, the app, clients: well over 10,000 objects in any serve process; the
    # second freeze of the serving process adds what the model load built to the first.
    assert counts["serve started"] > 10_000, counts
    assert counts["models loaded"] >= counts["serve started"], counts
    if shadow_process:
        assert counts["shadow worker loaded"] > 10_000, counts
    assert proc.returncode == 0, log.read_text()[-3000:]
