"""The shadow worker's candidate calls on the raw HTTP/1.1 keep-alive pool.

The worker spends most of a mirrored pair's CPU in the candidate call; through
``aiohttp``'s client that was ~35% of the worker's CPU per pair (docs/shadow-worker.md,
"Cost"). The transport here is :class:`proxy.backends.rawhttp.RawPool`, the same pool
the byte-level front uses for the champion (one deadline, the stale-connection retry,
TLS, framing, the errors: its docstring has the rules). This module only adapts it to
the worker's rebuilt calls:

* :class:`CandidateClient` posts ``(path, decoded headers, body)`` and returns a
  :class:`~proxy.backends.http.Reply` (reason decoded, hop-by-hop headers dropped), as
  :meth:`HttpBackend._send <proxy.backends.http.HttpBackend>` does;
* :class:`RawCandidate` wraps the candidate's ``HttpBackend``: what is sent and how the
  answer is read are the backend's (:meth:`~proxy.backends.http.HttpBackend.infer_request`
  / :meth:`~proxy.backends.http.HttpBackend.infer_result`: the encoding negotiated with
  the upstream, the forwarded headers, the request id, the upstream's errors); metadata,
  identity and everything else stay the backend's.

Each call leaves the pool's measurement of the exchange in
:data:`proxy.core.context.upstream_latency` (``RawReply.latency_s``: the kernel's receive
timestamp of the answer's last segment minus the send, on plain TCP), which the mirror
records as the candidate's latency: the worker reading the answer late (descheduled, or
niced) no longer makes the candidate look slower than it is.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from proxy.backends.http import HttpBackend, Reply, ssl_context
from proxy.backends.rawhttp import MAX_IDLE, RawPool, header_lines, request_head
from proxy.core import context
from proxy.protocol.base import ModelIdentity, ModelMetadata
from proxy.protocol.headers import end_to_end


class CandidateClient(RawPool):
    """A :class:`RawPool` that takes and gives what ``HttpBackend``'s transport does."""

    def __init__(
        self, url: str, *, tls: ssl.SSLContext | None = None, max_idle: int = MAX_IDLE
    ) -> None:
        super().__init__(url, ssl_context=tls, max_idle=max_idle)

    async def post(
        self, path: str, headers: list[tuple[str, str]], body: bytes, timeout_s: float
    ) -> Reply:
        head = request_head(
            b"POST", path.encode("ascii"), self.host_header, header_lines(headers), len(body)
        )
        raw = await self.request(head, body, timeout_s)
        context.upstream_latency.set(raw.latency_s)
        decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw.headers]
        connection = next((v for k, v in decoded if k.lower() == "connection"), None)
        return Reply(
            raw.status,
            raw.reason.decode("latin-1") or None,
            end_to_end(decoded, connection),
            raw.body,
        )


def supports(backend: HttpBackend) -> bool:
    """Whether the raw pool sends what aiohttp would for this backend: not for a URL
    carrying credentials (aiohttp turns them into basic auth; the pool does not)."""
    parts = urlsplit(backend.base_url)
    return parts.scheme in ("http", "https") and parts.username is None


class RawCandidate:
    """An :class:`HttpBackend` whose rebuilt ``infer`` calls go through the raw pool."""

    def __init__(self, backend: HttpBackend) -> None:
        self.backend = backend
        # infer_url already carries the base URL's path: the whole path is sent as is.
        parts = urlsplit(backend.infer_url)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.client = CandidateClient(backend.base_url, tls=ssl_context(backend.settings))

    @property
    def metadata(self) -> ModelMetadata:
        return self.backend.metadata

    @property
    def identity(self) -> ModelIdentity:
        return self.backend.identity

    def __getattr__(self, name: str) -> Any:
        # settings, model, base_url, binary, forward...: the wrapped backend's
        return getattr(self.backend, name)

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        body, headers = self.backend.infer_request(inputs, outputs)
        reply = await self.client.post(self._path, headers, body, self.backend.timeout_s)
        return await self.backend.infer_result(reply, outputs)

    async def aclose(self) -> None:
        self.client.close()
        await self.backend.aclose()
