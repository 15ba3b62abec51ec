"""Each in-process backend runs its model on its own worker threads.

Synchronous inference never runs on the event loop. A private pool (rather than the
loop's default executor) keeps one model's backlog from starving another model or
aiohttp's resolver, and lets ``aclose`` wait for exactly this model's runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from proxy.core.errors import NotReady

T = TypeVar("T")

# Runs of one model that may execute at once. onnxruntime sessions and torch modules in
# inference mode are safe to call from several threads; beyond a few, runs only contend
# for the same cores (each run already uses the runtime's intra-op threads).
DEFAULT_WORKERS = 4


class InferenceThreads:
    def __init__(
        self,
        name: str,
        *,
        workers: int = DEFAULT_WORKERS,
        initializer: Callable[[], object] | None = None,
    ) -> None:
        self._name = name
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"mirrorgate-{name}", initializer=initializer
        )
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a worker thread; NotReady once the backend is closed."""
        if self._closed:
            raise NotReady(f"model {self._name!r} is shut down")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, fn, *args)
        except RuntimeError as exc:  # pool shut down between the check and the submit
            raise NotReady(f"model {self._name!r} is shut down") from exc
        return await future

    async def aclose(self) -> None:
        """Refuse new runs and wait (off the loop) for the running ones to finish."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True)
