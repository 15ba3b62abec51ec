"""The shadow worker process: the candidate call, the pair, the recorder, the gates.

``mirrorgate serve`` starts it (proxy/shadow/supervisor.py). It runs the ordinary
:func:`proxy.server.app.create_app` with storage and gates on (so every sink, the rollout
service, the harvester, the replica coordinator and the control plane behave exactly as
in-process), on a loopback listener of its own that the live processes forward
``/v1/...`` and ``/metrics`` to. Its :class:`~proxy.dataplane.mirror.MirrorDispatcher` takes the
jobs live processes hand off through a Unix socket (:meth:`MirrorDispatcher.take`: the
same ``max_in_flight``/``queue_size``/``max_queue_bytes`` bounds and drop counters as
in-process) and acks them; every rollout evaluation it applies is sent back to every live
process as state (weight, stage, candidate stopped).

SIGINT is ignored (a Ctrl-C reaches the whole process group; the supervisor decides when
the worker stops: after the live processes drained into it); SIGTERM stops it
gracefully: mirrored work drains (``server.shutdown_timeout_s``), sinks flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, cast

from aiohttp import web
from prometheus_client import Counter

from proxy.backends.http import HttpBackend
from proxy.core import affinity
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import MirrorgateError
from proxy.core.heap import freeze_heap
from proxy.core.logqueue import configure_child_logging
from proxy.dataplane.state import LIVE_METRICS, STATE, ProxyState
from proxy.server.app import create_app
from proxy.shadow import candidate_client, wire
from proxy.shadow.metrics_merge import merge_exposition
from storage.sink import PairSink

log = logging.getLogger("mirrorgate.shadow")
PR_SET_PDEATHSIG = 1


class _Intake(asyncio.Protocol):
    """One live process's connection."""

    def __init__(self, hub: WorkerHub) -> None:
        self.hub = hub
        self.reader = wire.FrameReader()
        self.jobs = 0
        self.bytes = 0
        self.transport: asyncio.WriteTransport | None = None
        # This live process's last metric exposition (server.workers > 1), until it goes.
        self.metrics: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: duck-typed, as asyncio intends.
        transport = cast(asyncio.WriteTransport, transport)
        self.transport = transport
        self.hub.peers.add(self)
        self.send_state()

    def data_received(self, data: bytes) -> None:
        taken = 0
        for kind, payload in self.reader.feed(data):
            if kind == wire.METRICS:
                self.metrics = payload
                continue
            if kind != wire.JOB and kind != wire.EXCHANGE:
                continue
            self.hub.take(kind, payload)
            self.jobs += 1
            self.bytes += len(payload)
            taken += 1
        if taken and self.transport is not None:
            self.transport.write(wire.frame(wire.ACK_KIND, wire.ACK.pack(self.jobs, self.bytes)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.peers.discard(self)
        self.transport = None

    def send_state(self) -> None:
        if self.transport is not None:
            self.transport.write(wire.frame(wire.STATE, json.dumps(self.hub.state()).encode()))


class WorkerHub:
    """The worker's side of every live connection."""

    def __init__(self, proxy: ProxyState, control_url: str) -> None:
        self.proxy = proxy
        self.control_url = control_url
        self.peers: set[_Intake] = set()
        self.ready = False
        self.exchanges = wire.ExchangeReader()
        self.taken = Counter(
            "mirrorgate_shadow_handoff_taken",
            "Jobs the shadow worker took in from the live processes' hand-off.",
            registry=proxy.registry,
        )

    def state(self) -> dict[str, Any]:
        mirror = self.proxy.mirror
        ready = self.ready and mirror is not None
        return {
            "control_url": self.control_url,
            "ready": ready,
            "weight": mirror.canary_weight if mirror is not None else 0.0,
            "stage": mirror.stage if mirror is not None else "",
            "stopped": mirror.candidate_stopped if mirror is not None else False,
        }

    def merge_live_metrics(self, body: bytes) -> bytes:
        """The worker's exposition with every connected live process's last pushed one
        merged in (counters and histograms summed; gauges the worker's where it has one,
        else one live process's)."""
        pushed = [peer.metrics for peer in self.peers if peer.metrics]
        return merge_exposition(*pushed, body) if pushed else body

    def broadcast(self) -> None:
        for peer in list(self.peers):
            peer.send_state()

    def take(self, kind: int, payload: bytes) -> None:
        mirror = self.proxy.mirror
        if mirror is None:
            # Jobs from a live process that served before the worker loaded (readiness
            # was 503 then): counted like any other mirrored work not done.
            self.proxy.metrics.shadow_dropped.labels(reason="worker_loading").inc()
            return
        try:
            if kind == wire.EXCHANGE:
                job, other = self.exchanges.decode(payload), None
            else:
                job, other = pickle.loads(payload)
        except Exception:
            log.exception("a handed-off job could not be read")
            self.proxy.metrics.shadow_dropped.labels(reason="bad_job").inc()
            return
        self.taken.inc()
        if mirror.candidate_stopped and job.todo == "candidate" and other is None:
            # Handed off before the live process heard of the abort: the candidate gets
            # nothing more (as in-process, where an aborted candidate is not mirrored).
            return
        mirror.take(job, other)


def worker_entry(
    config: MirrorgateConfig,
    socket_path: str,
    pairs_out: str | None,
    conn: Connection,
    log_level: int,
    cpus: list[int] | None = None,
) -> None:
    """``multiprocessing`` target (spawn): run the worker until SIGTERM.

    ``cpus``: the CPUs to run on (``shadow.worker_cpus``, else the set serve started
    with: a spawned process inherits the live process's ``server.cpus``)."""
    # As in serve: a blocked stderr (a pipe nobody reads) must not stop this loop in a
    # log write; the worker logs the most (every failed evaluation write, with a database
    # outage). Only the writer thread waits (tests/faults/test_blocked_stderr.py).
    restore_logging = configure_child_logging(
        log_level, "%(asctime)s %(levelname)s %(name)s[shadow]: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.shadow.worker_nice:
        # Live work first: the scheduler runs this process on the CPU the live path leaves.
        os.nice(config.shadow.worker_nice)
    die_with_parent()
    try:
        if cpus is not None:
            affinity.pin(cpus, "shadow.worker_cpus")
        code = run_loop(_worker(config, socket_path, pairs_out, conn), config.server.event_loop)
    except MirrorgateError as exc:
        conn.send(("error", exc.message))
        code = 2
    except Exception as exc:
        log.exception("the shadow worker failed")
        conn.send(("error", f"shadow worker failed: {exc!r}"))
        code = 2
    finally:
        restore_logging()
    sys.exit(code)


def die_with_parent() -> None:
    """SIGTERM this process when the serving process dies (Linux ``PR_SET_PDEATHSIG``):
    a killed ``serve`` must not leave a worker holding the store or the decider lease.
    It then drains and flushes as on any SIGTERM."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot tie the worker's life to serve's on this platform")
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_loop(main: Any, event_loop: str = "asyncio") -> int:
    """``asyncio.run``, or ``uvloop.run`` for ``server.event_loop: uvloop``.

    Never a silent fallback to asyncio: preflight refused a config asking for uvloop
    where it is not installed, so an ImportError here is a broken install, raised."""
    if event_loop == "uvloop":
        import uvloop

        return int(uvloop.run(main))
    return int(asyncio.run(main))


def _sinks(config: MirrorgateConfig, pairs_out: str | None) -> list[PairSink]:
    sinks: list[PairSink] = []
    if pairs_out:
        from storage.jsonl_sink import JsonlSink

        sinks.append(JsonlSink(pairs_out, buffer_size=config.storage.buffer_size))
    return sinks


def _raw_candidate(state: ProxyState) -> None:
    """The mirrored candidate calls on the raw keep-alive pool (candidate_client.py).

    Swapped in after the models loaded: the pinned check at start used the aiohttp
    client, which is the same request by the same rules. A candidate that is not a bare
    ``HttpBackend`` (an in-process model) keeps its own ``infer``."""
    mirror, candidate = state.mirror, state.candidate
    if mirror is None or type(candidate) is not HttpBackend or mirror.candidate is not candidate:
        return
    if not candidate_client.supports(candidate):
        return
    raw = candidate_client.RawCandidate(candidate)
    state.candidate = mirror.candidate = raw


STATE_POLL_S = 0.1


async def _watch_state(hub: WorkerHub) -> None:
    """Broadcast the state whenever it changed, whatever changed it: evaluations are
    broadcast at once (``apply_and_broadcast``), but a new rollout after an abort (the
    lifecycle's ``restart_candidate``) applies no evaluation, and a live side still
    stopped would mirror nothing to make one (tests/deploy/test_rollout_controllers.py)."""
    last = hub.state()
    while True:
        await asyncio.sleep(STATE_POLL_S)
        now = hub.state()
        if now != last:
            hub.broadcast()
            last = now


async def _worker(
    config: MirrorgateConfig, socket_path: str, pairs_out: str | None, conn: Connection
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The worker serves /v1 and /metrics on its private loopback listener whatever port
    # the live side shows them on (``server.control_port`` is process 0's listener, which
    # forwards here): its own app keeps the control routes.
    config = config.model_copy(
        update={"server": config.server.model_copy(update={"control_port": None})}
    )
    app = create_app(config, sinks=_sinks(config, pairs_out), storage=True)
    state = app[STATE]
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.server.shutdown_timeout_s
    )
    await runner.setup()
    server: asyncio.AbstractServer | None = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        hub = WorkerHub(state, f"http://{host}:{port}")
        state.extras[LIVE_METRICS] = hub.merge_live_metrics
        if state.rollout is not None:
            applied = state.rollout.apply

            def apply_and_broadcast(evaluation: Any) -> None:
                if applied is not None:
                    applied(evaluation)
                hub.broadcast()

            state.rollout.apply = apply_and_broadcast
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        server = await loop.create_unix_server(lambda: _Intake(hub), socket_path)
        conn.send(("listening", hub.control_url))
        if state.loading is not None:
            stopper = loop.create_task(stop.wait())
            await asyncio.wait({stopper, state.loading}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if state.loading.done() and state.loading.exception() is not None:
                error = state.loading.exception()
                raise (
                    error
                    if isinstance(error, MirrorgateError)
                    else MirrorgateError(f"model load failed: {error!r}")
                )
        _raw_candidate(state)
        freeze_heap("shadow worker loaded")  # full GC passes skip the start-up heap
        hub.ready = True
        hub.broadcast()
        watcher = loop.create_task(_watch_state(hub))
        log.info("shadow worker ready (control plane %s)", hub.control_url)
        await stop.wait()
        watcher.cancel()
        log.info("shadow worker stopping: draining mirrored work")
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGTERM)
    return 0
