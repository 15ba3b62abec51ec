"""``mirrorgate serve`` with its shadow worker process, as real subprocesses.

The champion and candidate are real V2 upstreams in this test process; the proxy is a
real ``python -m proxy serve`` child that starts its worker (a second process). The
worker is stalled with SIGSTOP and crashed with SIGKILL: real signals, no test hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.faults.helpers import body, until
from tests.proxy.cli.test_serve import ROOT

TOKEN = "shadow-worker-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "classifier"


class Served:
    """A running ``mirrorgate serve`` and the lines of its stderr (read as they come)."""

    def __init__(self, proc: asyncio.subprocess.Process, base: str) -> None:
        self.proc = proc
        self.base = base
        self.lines: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace"))

    def worker_pids(self) -> list[int]:
        return [
            int(m.group(1))
            for line in self.lines
            if (m := re.search(r"shadow worker pid (\d+)", line))
        ]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 120)
        await self._reader
        return code


async def _serve(tmp_path: Path, champion: str, candidate: str, **extra: Any) -> Served:
    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 60000}

    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "model_name": MODEL,
            "control_token": TOKEN,
            "shutdown_timeout_s": 60,
        },
        "models": {
            "champion": model("champion", champion),
            "candidate": model("candidate", candidate),
        },
        "mirror": {"timeout_ms": 60000},
        "storage": {"url": f"sqlite:///{tmp_path / 'mirrorgate.sqlite'}"},
        **extra,
    }
    # No shadow.process here: its default (auto) splits for a remote candidate, which is
    # what these tests are about; _record_mix sets it both ways.
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--log-level",
        "WARNING",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
        "--pairs-out",
        str(tmp_path / "pairs.jsonl"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        assert line.startswith("mirrorgate: listening on "), line
        served = Served(proc, line.split()[-1])
        await until(lambda: _status(served.base, "/v2/health/ready", 200), "proxy ready")
    except BaseException:
        proc.kill()  # its worker follows (it dies with serve)
        await proc.wait()
        raise
    return served


async def _status(base: str, path: str, want: int) -> bool:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + path) as resp:
                return resp.status == want
    except aiohttp.ClientError:
        return False


async def _infer(session: aiohttp.ClientSession, base: str, i: int) -> None:
    async with session.post(f"{base}/v2/models/{MODEL}/infer", json=body(i)) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["id"] == f"r{i}"


def metric_values(text: str) -> dict[str, float]:
    """A Prometheus exposition as {series: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def _metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(f"{base}/metrics") as resp:
        return metric_values(await resp.text())


def _finished(upstream: Any) -> set[str]:
    return {rid for kind, rid in upstream.events if kind == "finish"}


def drained(m: dict[str, float]) -> bool:
    """No mirrored work in flight or queued (in a /metrics snapshot)."""
    return (
        m.get("mirrorgate_shadow_in_flight", 1) == 0
        and m.get("mirrorgate_shadow_queue_depth", 1) == 0
    )


async def _idle(session: aiohttp.ClientSession, base: str) -> bool:
    return drained(await _metrics(session, base))


async def test_pairs_and_gates_come_from_the_worker_and_abort_reaches_the_live_side(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    served = await _serve(tmp_path, champion.url, candidate.url)
    try:
        (worker,) = served.worker_pids()
        assert worker != served.proc.pid
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                await _infer(session, served.base, i)
            ids = {f"r{i}" for i in range(20)}
            await until(lambda: _finished(candidate.upstream) >= ids, "20 candidate calls")

            # labels through the forwarded control plane into the worker's gates
            labels = [{"id": f"r{i}", "label": 0} for i in range(20)]
            async with session.post(
                f"{served.base}/v1/feedback", json=labels, headers=AUTH
            ) as resp:
                assert resp.status == 202, await resp.text()
                assert (await resp.json())["joined"] == 20

            async def gates_counted_20() -> bool:
                async with session.get(f"{served.base}/v1/rollout", headers=AUTH) as resp:
                    assert resp.status == 200
                    return bool((await resp.json())["pairs"] == 20)

            await until(gates_counted_20, "the next evaluation counts the 20 labelled pairs")
            m = await _metrics(session, served.base)
            # merged: the live process's champion calls and the worker's candidate calls
            assert m['mirrorgate_proxy_requests_total{code="200",role="champion"}'] == 20
            assert m['mirrorgate_proxy_requests_total{code="200",role="candidate"}'] == 20
            assert m["mirrorgate_shadow_handoff_taken_total"] == 20

            async with session.post(
                f"{served.base}/v1/rollout/abort",
                json={"who": "test", "why": "stop the candidate"},
                headers=AUTH,
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["verdict"] == "abort"
            await until(lambda: _idle(session, served.base), "worker idle")
            taken = (await _metrics(session, served.base))["mirrorgate_shadow_handoff_taken_total"]
            calls = len(candidate.upstream.events)
            for i in range(100, 110):
                await _infer(session, served.base, i)
            m = await _metrics(session, served.base)
            # the live process no longer hands anything off: the candidate is stopped there
            assert m["mirrorgate_shadow_handoff_taken_total"] == taken
            assert len(candidate.upstream.events) == calls
        assert await served.stop() == 0
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
    # the worker recorded the 20 pairs (its JSON Lines sink, flushed at its exit)
    lines = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert {r["id"] for r in lines} == {f"r{i}" for i in range(20)}
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, 0)
        raise AssertionError("the shadow worker outlived serve")


async def test_a_stalled_worker_costs_drops_never_a_blocked_live_path(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    served = await _serve(tmp_path, champion.url, candidate.url, shadow={"handoff_max_jobs": 5})
    try:
        (worker,) = served.worker_pids()
        async with aiohttp.ClientSession() as session:
            os.kill(worker, signal.SIGSTOP)
            try:
                for i in range(30):  # every one answered while the worker cannot run
                    await _infer(session, served.base, i)
            finally:
                os.kill(worker, signal.SIGCONT)
            # 5 were handed off (never acked while stopped), the other 25 dropped
            first = {f"r{i}" for i in range(5)}
            await until(lambda: _finished(candidate.upstream) >= first, "5 candidate calls")
            m = await _metrics(session, served.base)
            assert m['mirrorgate_shadow_dropped_total{reason="handoff_full"}'] == 25
            assert m["mirrorgate_shadow_handoff_taken_total"] == 5
            assert _finished(candidate.upstream) == first
        assert await served.stop() == 0
    finally:
        if served.proc.returncode is None:
            served.proc.kill()


async def test_a_crashed_worker_is_restarted_and_the_live_path_keeps_serving(
    start_upstream: Any, tmp_path: Path
) -> None:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    served = await _serve(tmp_path, champion.url, candidate.url)
    try:
        (worker,) = served.worker_pids()
        async with aiohttp.ClientSession() as session:
            await _infer(session, served.base, 0)
            os.kill(worker, signal.SIGKILL)
            for i in range(1, 11):  # answered while the worker is dead or restarting
                await _infer(session, served.base, i)
            assert await _status(served.base, "/v2/health/ready", 200)
            await until(lambda: len(served.worker_pids()) == 2, "a restarted worker")

            sent = [f"r{i}" for i in range(11)]

            async def mirrored_again() -> bool:
                i = 1000 + len(sent)
                sent.append(f"r{i}")
                await _infer(session, served.base, i)
                # any of them: a pair is handed off after its answer, so the candidate
                # may finish it only after the client has its response
                return bool(set(sent[11:]) & _finished(candidate.upstream))

            await until(mirrored_again, "requests mirrored by the new worker")
            await until(lambda: _idle(session, served.base), "worker idle")
            m = await _metrics(session, served.base)
            assert m['mirrorgate_shadow_dropped_total{reason="worker_down"}'] >= 1
            # worker_down (live side) and worker_loading (the new worker, before its
            # models loaded) are the reasons a restart can cost
            lost = sum(v for k, v in m.items() if k.startswith("mirrorgate_shadow_dropped_total"))
            mirrored = set(sent) & _finished(candidate.upstream)
            # Every answered request was mirrored or counted as dropped; r0 may be neither
            # (taken in, then killed with the worker mid-call: the one uncounted case).
            assert len(sent) - 1 <= lost + len(mirrored) <= len(sent)
        assert await served.stop() == 0
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
    assert "the shadow worker exited" in "".join(served.lines)


async def _send_mix(session: aiohttp.ClientSession, base: str) -> int:
    """JSON, binary-tensor and batched requests, slice header and parameter: the
    shapes of traffic a pair is built from. Returns the pairs they make."""
    from proxy.protocol.codec import HEADER_LENGTH, encode_infer_request
    from tests.faults.helpers import features

    url = f"{base}/v2/models/{MODEL}/infer"
    pairs = 0
    for i in range(6):
        doc = body(i, rows=1 + i % 3)
        doc["parameters"] = {"tenant": f"t{i % 2}"}
        async with session.post(url, json=doc, headers={"X-Mirrorgate-Slice-region": "eu"}) as resp:
            assert resp.status == 200, await resp.text()
        pairs += 1 + i % 3
    for i in range(6, 10):
        raw, hl = encode_infer_request({"x": features(i, 1)}, request_id=f"r{i}")
        headers = {HEADER_LENGTH: str(hl), "Content-Type": "application/octet-stream"}
        async with session.post(url, data=raw, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        pairs += 1
    return pairs


def _comparable(path: Path) -> list[dict[str, Any]]:
    """The recorded pairs minus what differs between two runs by nature (time)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.pop("ts", None)
        for side in ("champion", "candidate"):
            row[side].pop("latency_ms", None)
    return sorted(rows, key=lambda r: r["id"])


async def _record_mix(
    run: Path, champion: str, candidate: str, process: bool
) -> tuple[int, list[dict[str, Any]]]:
    slicing = {"slices": {"headers": ["region"], "parameters": ["tenant"]}}
    served = await _serve(run, champion, candidate, shadow={"process": process}, **slicing)
    try:
        async with aiohttp.ClientSession() as session:
            pairs = await _send_mix(session, served.base)

            async def all_written() -> bool:
                m = await _metrics(session, served.base)
                return m.get("mirrorgate_recorder_written_total", 0) >= pairs

            await until(all_written, f"{pairs} pairs written")
            await until(lambda: _idle(session, served.base), "worker idle")
            m = await _metrics(session, served.base)
            # exact accounting: every request became its pairs, nothing dropped
            assert m["mirrorgate_recorder_written_total"] == pairs
            dropped = sum(v for k, v in m.items() if k.startswith("mirrorgate_shadow_dropped"))
            assert dropped == 0
            if process:
                assert m["mirrorgate_shadow_handoff_taken_total"] == 10
        assert await served.stop() == 0
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
    return pairs, _comparable(run / "pairs.jsonl")


async def test_the_worker_records_the_pairs_the_in_process_path_records_and_counts_each(
    start_upstream: Any, tmp_path: Path
) -> None:
    # the worker gets pass-through pairs as X frames and calls the candidate on the raw
    # client; the in-process path decodes the same job objects and calls through aiohttp
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    for name in ("in-process", "worker"):
        (tmp_path / name).mkdir()
    pairs, here = await _record_mix(tmp_path / "in-process", champion.url, candidate.url, False)
    _, there = await _record_mix(tmp_path / "worker", champion.url, candidate.url, True)
    assert len(there) == pairs == 16  # rows 1+2+3+1+2+3 and four single ones
    assert there == here
    # the slices came through the frame (a header) and the worker's decode (a parameter)
    json_rows = [r for r in there if "tenant" in r["slices"]]
    assert len(json_rows) == 12 and {r["slices"]["tenant"] for r in json_rows} == {"t0", "t1"}
    assert all(r["slices"]["region"] == "eu" for r in json_rows)
