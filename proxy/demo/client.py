"""The demo's traffic client as its own process: ``python -m proxy.demo.client ...``.

``mirrorgate demo`` runs the proxy in its process and the clients in this one, as in any
deployment: sharing one event loop (and one GIL) with the client would put the client's
work into the latencies the proxy measures, and the latency gate compares those.

Protocol (line based, so the parent needs nothing but pipes): the control token comes in
the ``MIRRORGATE_DEMO_TOKEN`` environment variable; the child prints
``{"requests": N, "answered": M}`` lines as answers come in and one final
``{"done": DriveStats.to_dict()}``; a line ``stop`` on its stdin ends the traffic early
(the requests in flight and the labels already due still go out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import threading
from typing import Any

from proxy.demo.driver import DriveStats, drive
from proxy.demo.traffic import Traffic, scenario

TOKEN_ENV = "MIRRORGATE_DEMO_TOKEN"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    # A daemon thread: a blocking readline must never keep the process alive.
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    with contextlib.suppress(RuntimeError):  # the loop may be gone already
        loop.call_soon_threadsafe(stop.set)


async def run_client(args: argparse.Namespace) -> int:
    settings = scenario(args.mode, seed=args.seed, id_prefix=args.prefix)
    if args.requests is not None:
        settings = dataclasses.replace(settings, requests=args.requests)
    traffic = Traffic(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()

    def progress(stats: DriveStats) -> None:
        _emit({"requests": stats.requests, "answered": stats.answered})

    stats = await drive(
        traffic,
        args.url,
        model=args.model,
        control_token=os.environ.get(TOKEN_ENV) or None,
        concurrency=args.concurrency,
        on_progress=progress,
        progress_every=25,
        should_stop=stop.is_set,
    )
    _emit({"done": stats.to_dict()})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mirrorgate demo traffic client")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=("fast", "full"), required=True)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--requests", type=int, help="requests to draw (default: the scenario's)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    return asyncio.run(run_client(args))


if __name__ == "__main__":
    raise SystemExit(main())
