"""The candidate's latency as the gates see it: measured by the transport (kernel receive
timestamps in the raw pool), not by a perf_counter around the await in a process that may
be descheduled (docs/benchmarks.md, "Upstream latency from kernel timestamps").

* a real worker-side client (``RawCandidate``) in a child process that is SIGSTOPped
  after its request reached a real V2 upstream and before the answer comes: it reads
  the answer seconds late, and its measurement does not include them;
* the mirror records that measurement for the pair (the backend stand-in here reports a
  value no real call could take, so the record shows which measurement was used).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.core import context
from tests.proxy.conftest import LIVE_PATHS, N_FEATURES, make_config

INFER = "/v2/models/classifier/infer"
BLOCK_S = 2.0  # how long the measuring process stays stopped after the answer left

# The worker's client, as the worker builds it (proxy/shadow/worker.py, _raw_candidate):
# one call, timed both ways.
CHILD = r"""
import asyncio, json, sys, time
import numpy as np
from proxy.backends.http import HttpBackend
from proxy.core import context
from proxy.core.config import BackendSettings
from proxy.shadow.candidate_client import RawCandidate

async def main(url, n_features):
    settings = BackendSettings(
        name="up", kind="http", url=url, model="model", timeout_ms=300000
    )
    raw = RawCandidate(await HttpBackend.create(settings))
    try:
        start = time.perf_counter()
        await raw.infer({"x": np.zeros((1, n_features), dtype=np.float32)})
        around = time.perf_counter() - start
        print(json.dumps({"around": around, "measured": context.upstream_latency.get()}))
    finally:
        await raw.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _stopped(pid: int) -> bool:
    # /proc/<pid>/stat: "pid (comm) state ...": T once SIGSTOP took effect
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


@pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP, /proc and SO_TIMESTAMPNS")
async def test_a_stopped_worker_reads_the_answer_late_but_measures_the_upstream(
    start_upstream: Any,
) -> None:
    up = await start_upstream(seed=1, mode="hold")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        up.url,
        str(N_FEATURES),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        # The request reached the upstream: the child has sent it and waits to read.
        await asyncio.wait_for(up.upstream.wait_for(started=1), 120)
        os.kill(child.pid, signal.SIGSTOP)
        for _ in range(6000):
            if _stopped(child.pid):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the child did not stop")
        up.upstream.release()  # the answer goes out while the child cannot read it
        await asyncio.wait_for(up.upstream.wait_for(finished=1), 60)
        await asyncio.sleep(BLOCK_S)
        os.kill(child.pid, signal.SIGCONT)
        out, _ = await asyncio.wait_for(child.communicate(), 120)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    timed = json.loads(out)
    # perf_counter around the await includes the stop; the stamped measurement of the
    # same exchange does not (the slack: the upstream's own write after "finished").
    assert timed["around"] >= BLOCK_S
    assert timed["measured"] is not None and 0 < timed["measured"] < timed["around"]
    assert timed["around"] - timed["measured"] >= BLOCK_S / 2


MEASURED_S = 1000.0  # what the stand-in's transport "measured": no real call takes it


class _Measured:
    """The real candidate backend, reporting a transport measurement as ``RawCandidate``
    does (a stand-in only for the value, so the record can show which one was used)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        result = await self.backend.infer(inputs, outputs)
        context.upstream_latency.set(MEASURED_S)
        return result


async def _one_pair(proxy: Any, rid: str) -> Any:
    x = np.random.default_rng(0).normal(size=(1, N_FEATURES)).astype(np.float32)
    body = {"id": rid, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, N_FEATURES]}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    response = await proxy.client.post(INFER, json=body)
    assert response.status == 200
    for _ in range(3000):
        found = [r for r in proxy.sink.records if r.id == rid]
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no pair recorded for {rid}")


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    # both live paths hand the candidate's call to the mirror's _mirrored_call
    return str(request.param)


async def test_the_mirror_records_the_transports_measurement(
    start_upstream: Any, start_proxy: Any
) -> None:
    champion, candidate = await start_upstream(seed=1), await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    mirror = proxy.state.mirror
    plain = mirror.candidate
    mirror.candidate = _Measured(plain)
    measured = await _one_pair(proxy, "measured")
    assert measured.candidate.latency_ms == MEASURED_S * 1000
    assert measured.champion.latency_ms != MEASURED_S * 1000  # the live side's own
    # A backend that measures nothing leaves the mirror's own timing (the value is
    # cleared before every call: nothing stale from an earlier one).
    mirror.candidate = plain
    timed = await _one_pair(proxy, "timed")
    assert timed.candidate.latency_ms is not None
    assert 0 < timed.candidate.latency_ms < MEASURED_S * 1000
