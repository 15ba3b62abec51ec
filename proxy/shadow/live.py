"""The live side of the hand-off: a bounded, never-blocking channel to the shadow worker.

A live process (``mirrorgate serve`` with a candidate) keeps its champion (and its
candidate, to answer canary traffic) but runs no mirrored work: its
:class:`~proxy.dataplane.mirror.MirrorDispatcher` hands every job to :meth:`ShadowChannel.submit`,
which writes it as one frame on a Unix socket to the worker (a pass-through pair as
its raw bytes, anything else pickled: proxy/shadow/wire.py). ``submit`` never
waits: it drops and counts (``mirrorgate_shadow_dropped_total{reason}``) when

* ``worker_down``: no worker connected (it died and is restarting, or is not up yet);
* ``handoff_full``: ``shadow.handoff_max_jobs`` jobs were sent and not yet taken in by
  the worker (it is stalled or overloaded);
* ``handoff_bytes``: ``shadow.handoff_max_bytes`` of them would be outstanding.

The worker acks what it has taken in (cumulative counts), so "outstanding" is exact, and
sends the rollout state the live path needs (canary weight, stage, candidate stopped);
readiness waits for the worker's first "ready" state, so an abort decided before serving
(the pinned check) holds from the first request. ``/v1/...`` is forwarded to the worker's
control listener (from the data port, or from the ``server.control_port`` listener's app
when that is set), and ``/metrics`` merges the worker's metrics into this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import struct
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from proxy.core.config import ShadowSettings
from proxy.core.errors import NotReady
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.limits import request_body
from proxy.dataplane.mirror import CallOutcome, _Job
from proxy.shadow import wire
from proxy.shadow.metrics_merge import merge_exposition

if TYPE_CHECKING:
    from proxy.dataplane.state import ProxyState

log = logging.getLogger(__name__)

RECONNECT_S = 0.1
# Jobs buffered before a write is forced within one loop iteration (bounded buffer).
FLUSH_JOBS = 64
# With server.workers > 1, how often a live process sends the worker its metrics. A
# scrape reaches any one live process (SO_REUSEPORT); each answers with the worker's
# view, where every live process's counters are (at most this old), so counters read the
# same whichever process answers and never go back.
METRICS_PUSH_S = 1.0
# Headers the control-plane forward passes on (both ways): auth and the body's type.
_FORWARD_REQUEST = ("Authorization", "Content-Type")


class _Protocol(asyncio.Protocol):
    def __init__(self, channel: ShadowChannel) -> None:
        self.channel = channel
        self.reader = wire.FrameReader()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: duck-typed, as asyncio intends.
        transport = cast(asyncio.WriteTransport, transport)
        self.channel._connected(transport)

    def data_received(self, data: bytes) -> None:
        for kind, payload in self.reader.feed(data):
            if kind == wire.ACK_KIND:
                self.channel._acked(*wire.ACK.unpack(payload))
            elif kind == wire.STATE:
                self.channel._state(json.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._disconnected()
        if not self.lost.done():
            self.lost.set_result(None)


class ShadowChannel:
    """Live process -> shadow worker. One per live process; implements ``Handoff``."""

    def __init__(self, path: str, settings: ShadowSettings, *, push_metrics: bool = False) -> None:
        self.path = path
        self.settings = settings
        # server.workers > 1: this process's metrics reach /metrics through the worker
        self.push_metrics = push_metrics
        self._registry: CollectorRegistry | None = None
        self._pusher: asyncio.Task[None] | None = None
        self.metrics: ProxyMetrics | None = None  # the live app's, bound by install()
        self.control_url: str | None = None
        self.worker_ready = False
        self.latest: dict[str, Any] | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._pending: list[tuple[_Job, CallOutcome | None]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._sent = self._sent_bytes = self._acked_jobs = self._acked_bytes = 0
        self._closing = False
        self._unpicklable_logged = False
        self._exchange_logged = False
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._proxy_state: ProxyState | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ the live path

    def submit(self, job: _Job, other: CallOutcome | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self._drop("worker_down")
            return
        if self._sent - self._acked_jobs >= self.settings.handoff_max_jobs:
            self._drop("handoff_full")
            return
        # Counted as sent from here (a disconnect before the write counts it lost, as
        # any job the worker never took in). The first job of a loop iteration is
        # written at once: the worker starts on it while the client is being answered
        # (measured best at concurrency 1). Jobs that follow in the same iteration (many
        # under load) are buffered and written together by one call_soon callback: one
        # system call and one worker wake-up for all of them.
        self._sent += 1
        self._pending.append((job, other))
        if self._flush_handle is None:
            self._write_pending()
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        elif len(self._pending) >= FLUSH_JOBS:
            self._write_pending()

    def _flush(self) -> None:
        """End of a coalescing window (also drain's): write what was buffered."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._write_pending()

    def _write_pending(self) -> None:
        pending, self._pending = self._pending, []
        transport = self._transport
        if not pending or transport is None:
            return  # _disconnected counted them (worker_down)
        frames: list[bytes] = []
        for job, other in pending:
            # A pass-through pair (nearly every job with a remote champion) goes as its
            # raw bytes in a compact frame; anything else is pickled.
            kind, payload = wire.EXCHANGE, self._exchange(job) if other is None else None
            try:
                if payload is None:
                    kind = wire.JOB
                    payload = pickle.dumps((job, other), protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, AttributeError, TypeError):
                # e.g. a job carrying a closure: never an error on the live path; the
                # job must carry data (raw bytes, arrays) and module-level callables.
                if not self._unpicklable_logged:
                    self._unpicklable_logged = True
                    log.exception("a mirrored job cannot be handed off (dropped, counted)")
                self._sent -= 1
                self._drop("unpicklable")
                continue
            outstanding = self._sent_bytes - self._acked_bytes + len(payload)
            if outstanding > self.settings.handoff_max_bytes:
                self._sent -= 1
                self._drop("handoff_bytes")
                continue
            frames.append(wire.frame(kind, payload))
            self._sent_bytes += len(payload)
        if frames:
            # A non-blocking write: the kernel takes it, else the transport buffers it
            # (the byte bound above caps that buffer).
            transport.write(b"".join(frames))

    def _exchange(self, job: _Job) -> bytes | None:
        try:
            return wire.encode_exchange(job)
        except (AttributeError, TypeError, ValueError, OverflowError, struct.error):
            # a field of another type than the frame carries (bytes for a text, a
            # value past its width): not an error, the job is pickled instead
            if not self._exchange_logged:
                self._exchange_logged = True
                log.warning("a pass-through job does not fit an X frame: pickled", exc_info=True)
            return None

    @property
    def outstanding(self) -> int:
        return self._sent - self._acked_jobs

    def _drop(self, reason: str, n: int = 1) -> None:
        assert self.metrics is not None
        self.metrics.shadow_dropped.labels(reason=reason).inc(n)

    # ------------------------------------------------------------ from the worker

    def _connected(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._sent = self._sent_bytes = self._acked_jobs = self._acked_bytes = 0
        log.info("connected to the shadow worker")

    def _disconnected(self) -> None:
        lost = self._sent - self._acked_jobs  # written or still pending: never taken in
        self._transport = None
        self._pending.clear()
        if lost:
            # Handed off but never taken in: the worker died with them.
            self._drop("worker_down", lost)
        self._sent = self._acked_jobs = 0
        if not self._closing:
            log.error("lost the shadow worker (%d handed-off jobs lost); reconnecting", lost)
        self._progress.set()

    def _acked(self, jobs: int, nbytes: int) -> None:
        self._acked_jobs, self._acked_bytes = jobs, nbytes
        self._progress.set()

    def _state(self, state: dict[str, Any]) -> None:
        self.control_url = state.get("control_url") or self.control_url
        if state.get("ready"):
            self.latest = state
            self.worker_ready = True
            self._apply()
        self._progress.set()

    def _apply(self) -> None:
        state, latest = self._proxy_state, self.latest
        if state is None or latest is None or state.mirror is None:
            return
        mirror = state.mirror
        if latest["stopped"] and not mirror.candidate_stopped:
            mirror.stop_candidate()
        elif not latest["stopped"] and mirror.candidate_stopped:
            # The worker started a new rollout for a new candidate revision (the
            # lifecycle's identity poll) after an abort: as in-process, it is called again.
            mirror.restart_candidate()
        try:
            mirror.set_canary_weight(float(latest["weight"]))
        except ValueError:
            log.exception("the shadow worker sent a canary weight this process cannot serve")
        mirror.set_stage(str(latest["stage"]))
        # Ready once both sides are: the worker decided what the live path may do.
        state.ready = True

    # ------------------------------------------------------------ wiring

    def attach(self, state: ProxyState) -> None:
        """The live app activated its dispatcher: route mirrored work here."""
        assert state.mirror is not None
        self._proxy_state = state
        state.mirror.handoff = self
        self._apply()

    def install(self, app: web.Application) -> None:
        from proxy.dataplane.state import STATE

        self.metrics = app[STATE].metrics
        self._registry = app[STATE].registry
        if app[STATE].config.server.control_port is None:
            # Else the control listener's app forwards (proxy/server/app.py _control_app):
            # the data port then serves no /v1, as without a worker.
            app.router.add_route("*", "/v1/{tail:.*}", self.forward_control)
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> Any:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._task = asyncio.get_running_loop().create_task(self._connect_loop())
        if self.push_metrics:
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())
        yield
        if self._pusher is not None:
            self._pusher.cancel()
        # Runs after every live request has been answered (aiohttp awaits handlers
        # first): everything the live path will hand off has been handed off.
        from proxy.dataplane.state import STATE

        await self.drain(app[STATE].config.server.shutdown_timeout_s)
        await self._session.close()

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            self._push_metrics()

    def _push_metrics(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._registry is None:
            return
        transport.write(wire.frame(wire.METRICS, generate_latest(self._registry)))

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self.path)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            await protocol.lost
            if not self._closing:
                await asyncio.sleep(RECONNECT_S)

    async def drain(self, timeout_s: float) -> int:
        """Wait until the worker took in every job (bounded); then disconnect.

        Returns the jobs cut (counted as dropped, reason ``shutdown``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        self._flush()  # what the last requests handed off goes out before the wait
        while self._transport is not None and self.outstanding > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        self._closing = True
        cut = self.outstanding if self._transport is not None else 0
        if cut:
            self._drop("shutdown", cut)
            log.warning("shutdown cut %d handed-off jobs the worker had not taken in", cut)
        if self.push_metrics:
            self._push_metrics()  # the last requests' counts, before the connection goes
        if self._transport is not None:
            self._transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return cut

    # ------------------------------------------------------------ control plane, metrics

    async def forward_control(self, request: web.Request) -> web.Response:
        """``/v1/...`` is served by the worker (it holds the gates and the store)."""
        if self.control_url is None or self._session is None:
            raise NotReady("the control plane is not up: the shadow worker is starting")
        headers = {k: request.headers[k] for k in _FORWARD_REQUEST if k in request.headers}
        body = await request_body(request)  # decoded: the worker's app gets it plain
        try:
            async with self._session.request(
                request.method,
                self.control_url + request.rel_url.path_qs,
                data=body or None,
                headers=headers,
            ) as resp:
                data = await resp.read()
                out = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
                return web.Response(status=resp.status, body=data, headers=out)
        except aiohttp.ClientError as exc:
            raise NotReady(f"the shadow worker's control plane is unreachable: {exc}") from exc

    async def metrics_text(self, local: bytes, authorization: str | None = None) -> bytes:
        """This process's metrics merged with the worker's (counters summed).

        With ``push_metrics`` (``server.workers > 1``) the worker's answer already holds
        every live process's pushed metrics, this one's included: it is served as it is,
        so each live process answers a scrape with the same counters.

        ``authorization``: the client's header, passed on (the worker checks
        ``server.metrics_token`` as this process did)."""
        if self.control_url is None or self._session is None:
            return local
        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with self._session.get(
                self.control_url + "/metrics",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                remote = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            log.warning("the shadow worker's metrics are unreachable: serving the live ones")
            return local
        if status != 200:
            log.warning("the shadow worker's metrics answered %d: serving the live ones", status)
            return local
        return remote if self.push_metrics else merge_exposition(local, remote)
