"""``server.cpus`` and ``shadow.worker_cpus``: a real ``mirrorgate serve`` with its shadow
worker, every thread of each process on the CPUs its role was given (read back from
``/proc/<pid>/task/<tid>/status``, the kernel's own view), and a CPU the process may not
use refused before anything starts."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.helpers import spawn_serve, start_serve
from tests.proxy.cli.test_serve import _body, _ready_status_is, _until

WORKER_PID = re.compile(r"shadow worker pid (\d+)")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs this process may use",
)


def _threads_on(pid: int) -> dict[int, str]:
    """Every thread of ``pid`` and the CPUs the kernel lets it run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        found = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.M)
        assert found is not None
        out[int(tid)] = found[1]
    return out


def _config(champion: str, candidate: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "model_name": "classifier"},
        "models": {
            "champion": model("champion", champion),
            "candidate": model("candidate", candidate),
        },
        "storage": {"url": f"sqlite:///{tmp_path / 'mirrorgate.sqlite'}"},
        "shadow": {"process": True},
    }
    for section, values in extra.items():
        config[section].update(values)
    return config


@pytest.mark.parametrize("worker_cpus", [True, False], ids=["worker-cpus", "worker-inherits"])
async def test_live_and_worker_threads_run_on_their_own_cpus(
    start_upstream: Any, tmp_path: Path, worker_cpus: bool
) -> None:
    first, second = sorted(os.sched_getaffinity(0))[:2]
    started_on = os.sched_getaffinity(0)
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    shadow = {"worker_cpus": [second]} if worker_cpus else {}
    config = _config(champion.url, candidate.url, tmp_path, server={"cpus": [first]}, shadow=shadow)
    log = tmp_path / "serve.stderr"
    proc, base = await start_serve(config, tmp_path, log)
    try:
        await _until(lambda: _ready_status_is(base, 200), "proxy ready")
        async with aiohttp.ClientSession() as session:
            for i in range(3):  # serving, with the pool and executor threads started
                async with session.post(
                    f"{base}/v2/models/classifier/infer", json=_body(i)
                ) as resp:
                    assert resp.status == 200, await resp.text()
        found = WORKER_PID.search(log.read_text(errors="replace"))
        assert found is not None
        worker = int(found[1])
        live_threads = _threads_on(proc.pid)
        worker_threads = _threads_on(worker)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
    # The serving process (several threads: logging, executor) on server.cpus only.
    assert len(live_threads) > 1 and set(live_threads.values()) == {str(first)}
    # The worker (recorder, gates and logging threads too): shadow.worker_cpus, else the
    # set serve started with, not the live process's pinned one it was spawned from.
    assert len(worker_threads) > 1
    if worker_cpus:
        assert set(worker_threads.values()) == {str(second)}
    else:
        wanted = {c for t in worker_threads.values() for c in _expand(t)}
        assert wanted == started_on
    assert proc.returncode == 0, log.read_text()[-3000:]


def _expand(cpu_list: str) -> set[int]:
    out: set[int] = set()
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


async def test_a_cpu_outside_the_allowed_set_is_refused_before_start(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    outside = max(os.sched_getaffinity(0)) + 1
    config = _config(champion.url, champion.url, tmp_path, shadow={"worker_cpus": [outside]})
    proc = await spawn_serve(config, tmp_path)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, (out + err).decode()
    assert (
        f"shadow.worker_cpus: CPU {outside} not in the set this process may run on" in err.decode()
    )
    assert not (tmp_path / "mirrorgate.sqlite").exists()  # nothing migrated
