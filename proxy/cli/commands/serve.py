"""``mirrorgate serve --config FILE [--host H] [--port P] [--pairs-out FILE]``.

Runs the proxy until SIGTERM/SIGINT, then stops gracefully: readiness turns 503 (and,
with ``server.drain_delay_s`` > 0, the proxy keeps serving that long or until a second
signal, so a load balancer stops routing first), the listening socket closes (no new
connections), in-flight live requests finish (bounded by ``server.shutdown_timeout_s``),
mirrored work drains or is cut and counted (same bound), backends close, sinks flush.
Prints ``mirrorgate: listening on http://HOST:PORT`` on stdout once the socket is bound
(``--port 0`` picks a free port), then, with ``server.control_port`` set,
``mirrorgate: control plane on http://HOST:PORT`` for the control listener. Connection
limits, timeouts and log rate limits come from ``server.limits`` (proxy/dataplane/limits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from gates.presets import DESCRIPTIONS as PRESET_TEXT
from proxy.core import affinity
from proxy.core.config import MirrorgateConfig, load_config
from proxy.core.errors import ConfigError, MirrorgateError
from proxy.core.heap import freeze_heap
from proxy.core.logqueue import install_queued_logging
from proxy.dataplane.front import DelegateDir, FrontServer, start_front, uses_bytes
from proxy.dataplane.limits import (
    GuardedAppRunner,
    default_max_connections,
    install_log_limits,
    remove_log_limits,
)
from proxy.dataplane.state import CONTROL_APP, STATE
from proxy.server.app import create_app
from storage.sink import PairSink

log = logging.getLogger("mirrorgate.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the proxy",
        description="Serve the champion, mirror to the candidate, record pairs.",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("MIRRORGATE_CONFIG"),
        help="YAML config file (default: $MIRRORGATE_CONFIG)",
    )
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port (0: any free port)")
    parser.add_argument(
        "--pairs-out",
        metavar="FILE",
        help="also append every pair to FILE as JSON Lines (the paired-record format)",
    )
    parser.set_defaults(func=run)


def build_sinks(config: MirrorgateConfig, args: argparse.Namespace) -> list[PairSink]:
    """The pair sinks of a served proxy: where the storage recorder gets wired in."""
    sinks: list[PairSink] = []
    if getattr(args, "pairs_out", None):
        from storage.jsonl_sink import JsonlSink

        sinks.append(JsonlSink(args.pairs_out, buffer_size=config.storage.buffer_size))
    return sinks


def run(args: argparse.Namespace) -> int:
    if not args.config:
        raise ConfigError("serve needs --config FILE (or MIRRORGATE_CONFIG)")
    config = load_config(args.config)
    server = config.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    config = config.model_copy(update={"server": server})
    # Model files, URLs and the database URL are checked before any migration or bind.
    from proxy.cli.preflight import check
    from proxy.shadow.supervisor import split_mode
    from proxy.shadow.worker import run_loop

    check(config, args.config)
    # A blocked stderr must not stop the event loop (and the live path) in a log write.
    restore_logging = install_queued_logging()
    try:
        if split_mode(config):
            # The sinks live in the shadow worker process (proxy/shadow/worker.py).
            pairs_out = getattr(args, "pairs_out", None)
            return run_loop(serve(config, pairs_out=pairs_out), config.server.event_loop)
        return run_loop(serve(config, sinks=build_sinks(config, args)), config.server.event_loop)
    finally:
        restore_logging()


def _freeze_when_loaded(loading: asyncio.Task[Any]) -> None:
    if not loading.cancelled() and loading.exception() is None:
        freeze_heap("models loaded")


async def serve(
    config: MirrorgateConfig,
    *,
    sinks: Sequence[PairSink] = (),
    announce: Callable[[str], None] = lambda line: print(line, flush=True),
    pairs_out: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. Raises on a failed start.

    With a candidate in split mode (``shadow.process``: ``auto`` and a remote candidate,
    or ``true``), this process is a live process and the
    shadow work runs in a worker process (proxy/shadow/supervisor.py); ``pairs_out`` is
    then the worker's JSON Lines sink.
    """
    from proxy.shadow.supervisor import ShadowSupervisor, split_mode

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor: ShadowSupervisor | None = None
    # The set serve started with: the shadow worker's, unless shadow.worker_cpus says.
    started_on = affinity.allowed()
    if config.server.cpus is not None:
        affinity.pin(config.server.cpus, "server.cpus")  # before any thread or process starts
    if split_mode(config):
        worker_cpus = config.shadow.worker_cpus or sorted(started_on) or None
        supervisor = ShadowSupervisor(config, pairs_out=pairs_out, worker_cpus=worker_cpus)
        try:
            await supervisor.start()
            app = supervisor.live_app()
        except BaseException:
            await supervisor.stop()
            raise
    elif config.server.workers > 1:
        raise ConfigError(
            "server.workers > 1 needs a candidate and the shadow worker "
            "(shadow.process: auto with a remote candidate, or true)"
        )
    else:
        # Storage on: pairs, labels, evaluations and decisions are recorded in
        # config.storage; a schema or database it cannot use stops the start (exit 2).
        app = create_app(config, sinks=sinks, storage=True)
    state = app[STATE]
    limits = config.server.limits
    log_limiter = install_log_limits(limits.log_lines_per_minute)
    max_connections = limits.max_connections or default_max_connections()
    use_bytes = uses_bytes(config.server.live_path, config.models.champion.kind)
    runner = GuardedAppRunner(
        app,
        # Behind the byte-level front the cap is the front's (one app connection per
        # client connection at most; the margin covers closes still in flight).
        max_connections=max_connections * 2 if use_bytes else max_connections,
        registry=state.registry,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_timeout_s,
        keepalive_timeout=limits.keepalive_timeout_s,
        access_log=None,
    )
    control_runner: web.AppRunner | None = None
    try:
        await runner.setup()
    except BaseException:
        if supervisor is not None:
            await supervisor.stop()
        raise
    front: FrontServer | None = None
    delegate_dir: DelegateDir | None = None
    # Full GC passes stall the live loop for as long as they traverse the heap: what
    # lives as long as the process is taken out of them, now and once loaded.
    freeze_heap("serve started")
    if state.loading is not None:
        state.loading.add_done_callback(_freeze_when_loaded)
    try:
        try:
            if use_bytes:
                # The byte-level live path (proxy/dataplane/front.py): this app behind it
                # on a private Unix socket, for everything the fast path hands on.
                front, delegate_dir, (host, port) = await start_front(
                    runner,
                    state,
                    config.server.host,
                    config.server.port,
                    limits=limits,
                    max_connections=max_connections,
                    shed=runner.shed,
                    reuse_port=supervisor is not None,
                )
            else:
                site = web.TCPSite(
                    runner,
                    config.server.host,
                    config.server.port,
                    reuse_port=supervisor is not None,
                )
                await site.start()
                host, port = runner.addresses[0][:2]
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}"
            ) from exc
        if supervisor is not None:
            supervisor.start_live(host, port)
        announce(f"mirrorgate: listening on http://{host}:{port}")
        control_app = state.extras.get(CONTROL_APP)
        if isinstance(control_app, web.Application):
            control_runner = web.AppRunner(
                control_app,
                handle_signals=False,
                keepalive_timeout=limits.keepalive_timeout_s,
                access_log=None,
            )
            await control_runner.setup()
            control_port = config.server.control_port or 0
            try:
                await web.TCPSite(control_runner, config.server.host, control_port).start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {config.server.host}:{control_port} "
                    f"(server.control_port): {exc.strerror}"
                ) from exc
            chost, cport = control_runner.addresses[0][:2]
            announce(f"mirrorgate: control plane on http://{chost}:{cport}")
        # After the addresses: scripts read "listening on" (then "control plane on") first.
        announce(
            f"mirrorgate: gates preset {config.gates.preset}: {PRESET_TEXT[config.gates.preset]}"
        )
        stopper = loop.create_task(stop.wait())
        waiting: set[asyncio.Future[Any]] = {stopper}
        if state.loading is not None:
            waiting.add(state.loading)
        if supervisor is not None and supervisor.failed is not None:
            waiting.add(supervisor.failed)  # the worker's model load failed
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if supervisor is not None and supervisor.failed in done:
            stopper.cancel()
            raise MirrorgateError(supervisor.failed.result())
        if state.loading is not None and state.loading in done:
            error = state.loading.exception()
            if error is not None:
                stopper.cancel()
                if isinstance(error, MirrorgateError):
                    raise error
                raise MirrorgateError(f"model load failed: {error!r}") from error
            await stopper
        state.draining = True
        if supervisor is not None:
            supervisor.signal_live()  # the other live processes turn 503 too
        delay = config.server.drain_delay_s
        if delay > 0:
            # Readiness is 503 now; keep serving while load balancers notice, until the
            # delay ends or a second signal says "now".
            log.info("signal received: readiness 503, serving for up to %.1f s more", delay)
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        log.info(
            "stopping: no new connections; draining (timeout %.1f s)",
            config.server.shutdown_timeout_s,
        )
    finally:
        if supervisor is not None:
            # SIGTERM the other live processes now: they drain alongside this one.
            supervisor.signal_live()
        if front is not None:
            # No new connections; requests in hand are answered (bounded) before the
            # app below stops (its cleanup drains the mirror those requests fed).
            front.stop_accepting()
            await front.drain(config.server.shutdown_timeout_s)
        if control_runner is not None:
            await control_runner.cleanup()
        await runner.cleanup()
        if front is not None:
            front.close()
        if delegate_dir is not None:
            delegate_dir.remove()
        if supervisor is not None:
            # Every live process has drained into the worker: now it drains and stops.
            await supervisor.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        remove_log_limits(log_limiter)
    log.info("stopped")
    return 0
