"""How ``mirrorgate serve`` runs with a candidate: live process(es) + one shadow worker.

* The serving process is live process 0; ``server.workers - 1`` more live processes
  bind the same port with ``SO_REUSEPORT`` (the kernel spreads connections over them).
  Each runs :func:`proxy.server.app.create_app` with a :class:`ShadowChannel`.
* One shadow worker process (proxy/shadow/worker.py) does every mirrored call, the
  pairs, the recorder, the gates and the control plane. Clients reach the control plane
  and /metrics through live process 0 (the data port, or ``server.control_port``'s
  listener in this process): ``/v1`` is forwarded to the worker, /metrics merged with it.
* A worker that dies is restarted (``shadow.restart``, after ``RESTART_DELAY_S``): the
  live path keeps serving meanwhile, its hand-offs counted as dropped
  (``worker_down``); readiness stays 200 because the live path is healthy.
* Stop: the live processes drain first (every accepted request answered, everything
  handed off taken in), then the worker gets SIGTERM and drains its mirrored work.

Processes are started with ``spawn`` (a fresh interpreter: no event loop, threads or
sockets inherited from the parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web

from proxy.core.config import MirrorgateConfig
from proxy.core.errors import ConfigError, MirrorgateError
from proxy.core.heap import freeze_heap
from proxy.core.logqueue import configure_child_logging
from proxy.dataplane.front import DelegateDir, FrontServer, start_front, uses_bytes
from proxy.dataplane.limits import GuardedAppRunner, default_max_connections
from proxy.dataplane.state import STATE
from proxy.server.app import create_app
from proxy.shadow.live import ShadowChannel
from proxy.shadow.worker import die_with_parent, run_loop, worker_entry

log = logging.getLogger("mirrorgate.serve")

RESTART_DELAY_S = 0.5
READY_POLL_S = 0.05  # how often an extra live process checks it is ready to bind
START_TIMEOUT_S = 120.0


def split_mode(config: MirrorgateConfig) -> bool:
    """Whether ``serve`` runs the shadow work in its own process (``shadow.process``).

    With ``server.control_port`` the control listener stays in the serving process
    (live process 0): it forwards ``/v1/...`` to the worker and merges ``/metrics``
    (proxy/server/app.py ``_control_app``)."""
    candidate = config.models.candidate
    if candidate is None or config.shadow.process is False:
        return False
    return config.shadow.process is True or candidate.kind == "http"


class ShadowSupervisor:
    """Starts, watches, restarts and stops the shadow worker and extra live processes."""

    def __init__(
        self,
        config: MirrorgateConfig,
        *,
        pairs_out: str | None = None,
        worker_cpus: list[int] | None = None,
    ) -> None:
        self.config = config
        self.pairs_out = pairs_out
        # The worker's CPUs (a restarted worker's too); None: inherited from this process.
        self.worker_cpus = worker_cpus
        self._dir = tempfile.mkdtemp(prefix="mirrorgate-shadow-")
        os.chmod(self._dir, 0o700)
        self.socket_path = os.path.join(self._dir, "handoff.sock")
        self._ctx = multiprocessing.get_context("spawn")
        self.worker: BaseProcess | None = None
        self._conn: Connection | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.failed: asyncio.Future[str] | None = None
        self.live: list[BaseProcess] = []
        self.restarts = 0

    # ------------------------------------------------------------ worker

    async def start(self) -> None:
        """Start the worker; raises its start error (storage, schema) as a MirrorgateError."""
        self.failed = asyncio.get_running_loop().create_future()
        await self._start_worker()
        self._watch = asyncio.get_running_loop().create_task(self._watch_worker())

    async def _start_worker(self) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_entry,
            args=(
                self.config,
                self.socket_path,
                self.pairs_out,
                child,
                logging.getLogger().getEffectiveLevel(),
                self.worker_cpus,
            ),
            name="mirrorgate-shadow",
        )
        proc.start()
        child.close()
        self.worker, self._conn = proc, parent
        print(f"mirrorgate: shadow worker pid {proc.pid}", file=sys.stderr, flush=True)
        message = await self._recv(START_TIMEOUT_S)
        if message is None or message[0] != "listening":
            with contextlib.suppress(Exception):
                proc.kill()
            reason = message[1] if message and message[0] == "error" else None
            raise MirrorgateError(str(reason or "the shadow worker did not start"))

    async def _recv(self, wait_s: float | None) -> tuple[str, Any] | None:
        """The worker's next message, ``("eof", None)`` once it exited, None on timeout.

        Waits on the pipe's descriptor in the event loop (no thread left blocked when
        serve stops)."""
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        fd = conn.fileno()
        loop.add_reader(fd, wake)
        try:
            async with asyncio.timeout(wait_s):
                await readable
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)
        try:
            message: tuple[str, Any] = conn.recv()
        except (EOFError, OSError):
            return ("eof", None)
        return message

    async def _watch_worker(self) -> None:
        while not self._stopping:
            proc, conn = self.worker, self._conn
            assert proc is not None and conn is not None
            loop = asyncio.get_running_loop()
            # Wakes on a message (a load error) or on the process's end (pipe EOF).
            message = await self._recv(None)
            if self._stopping:
                return
            if message is not None and message[0] == "error":
                assert self.failed is not None
                if not self.failed.done():
                    self.failed.set_result(str(message[1]))
                return
            if message is not None and message[0] != "eof":
                continue
            await loop.run_in_executor(None, proc.join, 5.0)
            if self._stopping:
                return
            log.error("the shadow worker exited (code %s)", proc.exitcode)
            conn.close()
            if not self.config.shadow.restart:
                return
            await asyncio.sleep(RESTART_DELAY_S)
            try:
                await self._start_worker()
            except MirrorgateError as exc:
                log.error("restarting the shadow worker failed: %s", exc.message)
                return
            self.restarts += 1
            log.warning("shadow worker restarted (%d restarts)", self.restarts)

    # ------------------------------------------------------------ live processes

    def live_app(self) -> web.Application:
        """Live process 0's app (this process)."""
        return live_app(self.config, self.socket_path)

    def start_live(self, host: str, port: int) -> None:
        for _ in range(self.config.server.workers - 1):
            proc = self._ctx.Process(
                target=live_entry,
                args=(
                    self.config,
                    self.socket_path,
                    host,
                    port,
                    logging.getLogger().getEffectiveLevel(),
                ),
                name="mirrorgate-live",
            )
            proc.start()
            self.live.append(proc)

    # ------------------------------------------------------------ stop

    def signal_live(self) -> None:
        """SIGTERM the extra live processes (first: readiness 503 and the drain delay,
        as in this process; second: stop), without waiting for them."""
        for proc in self.live:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    async def _join_live(self) -> None:
        limit = self.config.server.shutdown_timeout_s * 2 + 10
        for proc in self.live:
            await asyncio.to_thread(proc.join, limit)
            if proc.is_alive():
                proc.kill()

    async def stop(self) -> None:
        """After the live side drained: stop the worker (it drains its mirrored work)."""
        self._stopping = True
        await self._join_live()
        proc = self.worker
        if proc is not None and proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
            await asyncio.to_thread(proc.join, self.config.server.shutdown_timeout_s * 2 + 10)
            if proc.is_alive():
                log.error("the shadow worker did not stop in time: killed")
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        shutil.rmtree(self._dir, ignore_errors=True)


def live_app(config: MirrorgateConfig, socket_path: str) -> web.Application:
    channel = ShadowChannel(socket_path, config.shadow, push_metrics=config.server.workers > 1)
    return create_app(config, handoff=channel)


def live_entry(
    config: MirrorgateConfig, socket_path: str, host: str, port: int, log_level: int
) -> None:
    """``multiprocessing`` target (spawn): one more live process on the shared port."""
    restore_logging = configure_child_logging(
        log_level, "%(asctime)s %(levelname)s %(name)s[live]: %(message)s"
    )
    # The supervisor stops this process (SIGTERM) after its own listener closed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    try:
        code = run_loop(_live(config, socket_path, host, port), config.server.event_loop)
    finally:
        restore_logging()
    sys.exit(code)


async def _live(config: MirrorgateConfig, socket_path: str, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    app = live_app(config, socket_path)
    limits = config.server.limits
    max_connections = limits.max_connections or default_max_connections()
    use_bytes = uses_bytes(config.server.live_path, config.models.champion.kind)
    runner = GuardedAppRunner(
        app,
        max_connections=max_connections * 2 if use_bytes else max_connections,
        registry=app[STATE].registry,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_timeout_s,
        keepalive_timeout=limits.keepalive_timeout_s,
        access_log=None,
    )
    await runner.setup()
    front: FrontServer | None = None
    where: DelegateDir | None = None
    freeze_heap("live process started")  # full GC passes skip the start-up heap
    state = app[STATE]
    try:
        # Bound only once ready: process 0 already serves the port, and a listener that
        # answers 503 "models are loading" on the connections the kernel hands it fails
        # requests a ready process would have served (readiness said 200 meanwhile).
        # (state.ready is a flag the app's start-up and the worker's state set: polled.)
        while not (state.ready or state.load_error or stop.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READY_POLL_S)
        if stop.is_set():
            return 0
        try:
            if use_bytes:
                # As in serve: the byte-level front on the shared port, this app behind it.
                front, where, _ = await start_front(
                    runner,
                    app[STATE],
                    host,
                    port,
                    limits=limits,
                    max_connections=max_connections,
                    shed=runner.shed,
                    reuse_port=True,
                )
            else:
                await web.TCPSite(runner, host, port, reuse_port=True).start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        await stop.wait()
        app[STATE].draining = True
        if config.server.drain_delay_s > 0:
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.server.drain_delay_s)
    finally:
        if front is not None:
            front.stop_accepting()
            await front.drain(config.server.shutdown_timeout_s)
        await runner.cleanup()
        if front is not None:
            front.close()
        if where is not None:
            where.remove()
    return 0
