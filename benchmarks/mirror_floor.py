"""The cheapest Python mirror proxy we could write: a measurement, not product code.

    python benchmarks/mirror_floor.py --upstream http://127.0.0.1:8001 \
        [--candidate http://127.0.0.1:8002] [--handoff] [--port 0]

What is the least a Python process on one asyncio event loop must pay to answer from a
champion and mirror to a candidate? This forwards at the ``asyncio.Protocol`` level: the
client's request bytes (head and body, unparsed beyond ``Content-Length``) go as they
came to a pooled keep-alive champion connection, the champion's response bytes go back
as they came, and the same request bytes are queued to a candidate connection (at most
``--mirror-in-flight`` calls, ``--mirror-queue`` waiting, the rest dropped and counted).
No header rewriting, no JSON, no metrics, no pair recording, no limits, no error bodies.
With ``--handoff`` each (request, response) pair is also written, length-framed and
coalesced per loop iteration, to a child process that reads and discards it: the cost
of handing pairs to a shadow worker, which is how ``mirrorgate serve`` works.

``GET /_mirror_stats`` answers the mirrored calls made, finished, failed and dropped.
benchmarks/proxy_overhead.py runs it as the "asyncio.Protocol mirror (prototype)" rows.
It assumes what the benchmark's upstreams send: HTTP/1.1 with ``Content-Length`` (no
chunked bodies) and no pipelining by the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import struct
import sys
from urllib.parse import urlsplit

HEAD_END = b"\r\n\r\n"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class _Message:
    """Accumulates one HTTP/1.1 message (head + Content-Length body)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need: int | None = None  # total bytes of the message once the head is known

    def feed(self, data: bytes) -> bytes | None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(HEAD_END)
            if end < 0:
                return None
            self.need = end + 4 + _content_length(bytes(self.buf[:end]))
        if len(self.buf) < self.need:
            return None
        message = bytes(self.buf[: self.need])
        del self.buf[: self.need]
        self.need = None
        return message


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to an upstream; one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.message = _Message()
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reply = self.message.feed(data)
        if reply is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))
        self.transport = None

    async def exchange(self, request: bytes) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Upstream] = []

    async def exchange(self, request: bytes) -> bytes:
        conn = None
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None:
                break
            conn = None
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: _Upstream(self), self.host, self.port)
        reply = await conn.exchange(request)
        self.idle.append(conn)
        return reply


class _Mirror:
    """Bounded fire-and-forget copies of the request to the candidate."""

    def __init__(self, pool: _Pool, in_flight: int, queue: int) -> None:
        self.pool = pool
        self.max_in_flight, self.max_queue = in_flight, queue
        self.queue: collections.deque[bytes] = collections.deque()
        self.running = 0
        self.stats = dict.fromkeys(("started", "finished", "failed", "dropped"), 0)

    def submit(self, request: bytes) -> None:
        if self.running < self.max_in_flight:
            self._start(request)
        elif len(self.queue) < self.max_queue:
            self.queue.append(request)
        else:
            self.stats["dropped"] += 1

    def _start(self, request: bytes) -> None:
        self.running += 1
        self.stats["started"] += 1
        task = asyncio.get_running_loop().create_task(self.pool.exchange(request))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[bytes]) -> None:
        self.running -= 1
        ok = not task.cancelled() and task.exception() is None
        self.stats["finished" if ok else "failed"] += 1
        if self.queue:
            self._start(self.queue.popleft())


class _Handoff:
    """Pairs to a child process over a Unix socket, coalesced per loop iteration."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: list[bytes] = []
        self.scheduled = False
        self.transport: asyncio.WriteTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=self.sock)

    def submit(self, request: bytes, reply: bytes) -> None:
        self.pending.append(struct.pack(">II", len(request), len(reply)) + request + reply)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        assert self.transport is not None
        self.transport.write(b"".join(self.pending))
        self.pending.clear()


class _Client(asyncio.Protocol):
    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy
        self.message = _Message()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        request = self.message.feed(data)
        if request is not None:
            asyncio.get_running_loop().create_task(self.proxy.handle(request, self))


class _Proxy:
    def __init__(self, champion: _Pool, mirror: _Mirror | None, handoff: _Handoff | None):
        self.champion, self.mirror, self.handoff = champion, mirror, handoff

    async def handle(self, request: bytes, client: _Client) -> None:
        if request.startswith(b"GET /_mirror_stats "):
            stats = json.dumps(self.mirror.stats if self.mirror else {}).encode()
            reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(stats), stats)
        else:
            reply = await self.champion.exchange(request)
        if client.transport is not None:
            client.transport.write(reply)
        if self.mirror is not None and request.startswith(b"POST "):
            self.mirror.submit(request)
        if self.handoff is not None and request.startswith(b"POST "):
            self.handoff.submit(request, reply)


def _sink(sock: socket.socket) -> None:
    """The child: reads the hand-off stream and throws it away (the worker's intake)."""
    with sock:
        while sock.recv(1 << 16):
            pass
    os._exit(0)


async def main(ns: argparse.Namespace) -> None:
    def pool(url: str) -> _Pool:
        parts = urlsplit(url)
        return _Pool(parts.hostname or "127.0.0.1", parts.port or 80)

    handoff = None
    if ns.handoff:
        live, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.fork() == 0:
            live.close()
            _sink(child)
        child.close()
        handoff = _Handoff(live)
        await handoff.start()
    mirror = (
        _Mirror(pool(ns.candidate), ns.mirror_in_flight, ns.mirror_queue) if ns.candidate else None
    )
    proxy = _Proxy(pool(ns.upstream), mirror, handoff)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(proxy), "127.0.0.1", ns.port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"mirror floor: listening on http://{host}:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--candidate")
    parser.add_argument("--handoff", action="store_true")
    parser.add_argument("--mirror-in-flight", type=int, default=64)
    parser.add_argument("--mirror-queue", type=int, default=4096)
    parser.add_argument("--port", type=int, default=0)
    ns = parser.parse_args()
    if sys.platform == "win32":
        raise SystemExit("POSIX only (fork, Unix sockets)")
    asyncio.run(main(ns))
