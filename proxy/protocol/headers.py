"""Which HTTP headers cross the proxy (RFC 9110 section 7.6.1; docs/proxy.md).

Hop-by-hop headers belong to one connection and never cross; everything else is
end-to-end. The champion gets every end-to-end header of the client's request (its
``authorization``, ``traceparent``, custom headers), because in front of a real server the
request it sees must be the client's. The candidate gets the tracing headers only unless
``upstream.forward_headers`` says otherwise: credentials meant for production are not
sent to a model under test by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from proxy.core.config import BackendSettings

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
TRACING = ("traceparent", "tracestate", "baggage")
# Framing the proxy recomputes for the body it sends (aiohttp sets its own
# Content-Length; a rebuilt body is not compressed): never copied onto a rebuilt request.
# Pass-through sends the client's Content-Encoding on with the client's raw body bytes
# (proxy.dataplane.passthrough.forward).
REQUEST_FRAMING = frozenset({"host", "content-length", "content-encoding"})
# Headers a rebuilt request (encoded by mirrorgate) sets itself.
REBUILT = frozenset(
    {"content-type", "accept-encoding", "inference-header-content-length", "x-request-id"}
)

Headers = tuple[tuple[str, str], ...]


def end_to_end(items: Iterable[tuple[str, str]], connection: str | None = None) -> Headers:
    """The end-to-end part of a header list (also dropping those named by Connection)."""
    named = {t.strip().lower() for t in (connection or "").split(",") if t.strip()}
    return tuple((k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in named)


def client_request_headers(headers: Mapping[str, str]) -> Headers:
    """The client's end-to-end request headers, minus framing the proxy redoes."""
    items = getattr(headers, "items", None)
    pairs = list(items()) if items is not None else []
    kept = end_to_end(pairs, headers.get("Connection"))
    return tuple((k, v) for k, v in kept if k.lower() not in REQUEST_FRAMING)


def forwarded_headers(client: Headers, settings: BackendSettings | None, role: str) -> Headers:
    """The client headers a model call of ``role`` sends on (rebuilt requests)."""
    if not client or settings is None or settings.kind != "http":
        return ()
    chosen = settings.upstream.forward_headers
    if chosen is None:
        chosen = ["*"] if role == "champion" else list(TRACING)
    allowed = {h.lower() for h in chosen}
    every = "*" in allowed
    return tuple(
        (k, v) for k, v in client if k.lower() not in REBUILT and (every or k.lower() in allowed)
    )


def candidate_passthrough_headers(client: Headers, settings: BackendSettings | None) -> Headers:
    """The client headers a canary request forwarded as-is to a remote candidate sends:
    those describing the body and the answer wanted (``Content-Type``, the binary
    header length, ``Accept-Encoding``, ``X-Request-Id``: the candidate must read the
    client's bytes and the client the candidate's) plus the candidate's configured ones
    (tracing only by default: production credentials are not for a model under test)."""
    chosen = {k.lower() for k, _ in forwarded_headers(client, settings, "candidate")}
    return tuple((k, v) for k, v in client if k.lower() in REBUILT or k.lower() in chosen)
