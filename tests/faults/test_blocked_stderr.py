"""A blocked stderr does not stop the live path.

``mirrorgate serve`` is a real child process whose stderr is a pipe this test holds and
never reads, shrunk to one page (4 KiB). The database file is deleted under it, so every
gate evaluation fails to persist and logs a traceback from the event loop: the pipe fills
at once. Whether serve is blocked in the write is read from /proc/PID/task/*/wchan
(Linux). Before logging went through a queue and a writer thread
(proxy/core/logqueue.py), the next log line blocked the event loop in ``write`` and no
request was answered again (what wedged benchmarks/fault_matrix.py). Now only the writer
thread waits; every request is still answered 200 by the champion.
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.helpers import body, own_upstream, ready, stop, until

F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity
PIPE_BYTES = 4096


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc/PID/task/TID/children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue  # it ended meanwhile
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def _writing_to_pipe(pid: int) -> bool:
    """Some thread of ``pid`` or of a process it started (the shadow worker) sleeps in
    the kernel's pipe write: stderr is blocked. (A pipe is full when it has no free page,
    not when it holds PIPE_BYTES bytes: a traceback larger than the room left waits with
    the pipe part empty.)"""
    for proc in _tree(pid):
        try:
            tasks = list(Path(f"/proc/{proc}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                if "pipe_write" in (task / "wchan").read_text():
                    return True
            except OSError:
                continue  # the thread ended meanwhile
    return False


def _pipe_bytes(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int(buf[0])


@pytest.mark.parametrize("process", [False, "auto"], ids=["in-process", "worker"])
async def test_live_path_answers_while_stderr_is_blocked(
    tmp_path: Path, process: bool | str
) -> None:
    # Both shapes of serve: one process (shadow.process false), and the default with a
    # remote candidate, where the shadow worker (a child sharing the stderr) logs the
    # failed evaluation writes: its writer thread blocks, never a loop.
    from tests.faults.helpers import spawn_serve

    champion = await own_upstream(seed=1)
    candidate = await own_upstream(seed=2)
    db = tmp_path / "pairs.sqlite"

    def model(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "kind": "http", "url": url, "model": "model", "timeout_ms": 5000}

    config = {
        "server": {"model_name": "classifier"},
        "models": {"champion": model("c1", champion.url), "candidate": model("c2", candidate.url)},
        "mirror": {"timeout_ms": 2000, "shadow_after_abort": True},
        "storage": {"url": f"sqlite:///{db}", "flush_interval_ms": 50},
        # An evaluation per new pair: with the database gone, a logged traceback each.
        "rollout": {"evaluate_every_pairs": 1, "evaluate_every_s": 0.2},
        "shadow": {"process": process},
    }
    read_end, write_end = os.pipe()
    assert fcntl.fcntl(read_end, F_SETPIPE_SZ, PIPE_BYTES) == PIPE_BYTES
    proc = await spawn_serve(config, tmp_path, write_end)
    os.close(write_end)  # the child holds it; nobody ever reads read_end
    pid = proc.pid
    try:
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        assert line.startswith("mirrorgate: listening on "), line
        base = line.split()[-1]
        await until(lambda: ready(base), "proxy ready")
        timeout = aiohttp.ClientTimeout(total=60)  # generous: a blocked loop never answers
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sent = 0

            async def infer() -> int:
                nonlocal sent
                sent += 1
                async with session.post(
                    f"{base}/v2/models/classifier/infer", json=body(sent)
                ) as resp:
                    await resp.read()
                    return resp.status

            async def written() -> bool:
                assert await infer() == 200
                async with session.get(f"{base}/metrics") as resp:
                    text = await resp.text()
                for line in text.splitlines():
                    if line.startswith("mirrorgate_recorder_written_total "):
                        return float(line.split()[-1]) >= 5
                return False

            # Pairs in the file first: the database is then gone under open connections.
            await until(written, "five pairs written")
            db.unlink()

            async def stderr_blocked() -> bool:
                assert await infer() == 200
                return _writing_to_pipe(pid)

            await until(stderr_blocked, "serve blocked writing to its stderr")
            held = _pipe_bytes(read_end)
            # stderr stays blocked: every further log line has to wait. Each of these
            # requests makes a pair, an evaluation and a traceback to log.
            statuses = [await infer() for _ in range(30)]
            assert statuses == [200] * 30
            assert _writing_to_pipe(pid)
            assert _pipe_bytes(read_end) == held  # nothing more got out, nothing was read
            async with session.get(f"{base}/v2/health/ready") as resp:
                assert resp.status == 200
    finally:
        # The read end first: a process still blocked writing to it (the shadow worker,
        # which outlives a killed serve long enough to drain and exit) gets EPIPE and
        # exits, instead of holding serve's stdout pipe that stop() waits on.
        os.close(read_end)
        await stop(proc)
        await champion.close()
        await candidate.close()
