"""A PairSink that appends pairs to a JSON Lines file (the paired-record format).

For runs without a database (``mirrorgate serve --pairs-out FILE``, tests, replays of
live traffic with ``mirrorgate replay --pairs FILE``). Same discipline as every sink:
``submit`` appends to a bounded in-memory buffer and never blocks or raises; a
background task writes the buffer every ``flush_interval_s`` in a worker thread;
``aclose`` writes everything accepted. Records past ``buffer_size`` are dropped and
counted in ``dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from pathlib import Path

from gates.records import PairRecord

log = logging.getLogger(__name__)


class JsonlSink:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        buffer_size: int = 100_000,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.buffer_size = buffer_size
        self.flush_interval_s = flush_interval_s
        self._buffer: deque[PairRecord] = deque()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.written = 0
        self.dropped = 0

    def submit(self, record: PairRecord) -> bool:
        if len(self._buffer) >= self.buffer_size:
            self.dropped += 1
            return False
        self._buffer.append(record)
        return True

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # Stopped by an event, not cancelled: a cancel could land while a batch is being
        # written in the worker thread and let the final flush interleave with it.
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.flush_interval_s)
            try:
                await self.flush()
            except OSError:
                log.exception("writing pairs to %s failed", self.path)

    async def flush(self) -> None:
        async with self._lock:
            batch = list(self._buffer)
            if not batch:
                return
            for _ in batch:
                self._buffer.popleft()
            await asyncio.to_thread(self._write, batch)
            self.written += len(batch)

    def _write(self, batch: list[PairRecord]) -> None:
        text = "".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in batch)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)

    async def aclose(self) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
            self._task = None
        await self.flush()
