"""Per-call context that travels beside the Backend interface without widening it.

The mirror sets ``request_id`` around every model call (live and mirrored); backends
that can carry it further do so (``HttpBackend`` sends it as the V2 ``id`` and
``X-Request-Id``, so upstream logs correlate with the pair's id).
"""

from __future__ import annotations

from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("mirrorgate_request_id", default=None)

# The client's end-to-end request headers (hop-by-hop ones removed), set by the data
# plane per request and carried with mirrored work; ``upstream_headers`` is the part of
# them a model call sends on (proxy.protocol.headers.forwarded_headers picks it per role).
Headers = tuple[tuple[str, str], ...]
client_headers: ContextVar[Headers] = ContextVar("mirrorgate_client_headers", default=())
upstream_headers: ContextVar[Headers] = ContextVar("mirrorgate_upstream_headers", default=())

# The last upstream exchange's latency as its transport measured it (the raw pool's
# kernel receive timestamps: proxy/backends/rawhttp.py), or None when the backend
# measured none. The mirror clears it before a model call and, when the call set it,
# records it instead of its own perf_counter around the await, which a descheduled
# process (the shadow worker under load or ``shadow.worker_nice``) would inflate.
upstream_latency: ContextVar[float | None] = ContextVar("mirrorgate_upstream_latency", default=None)
