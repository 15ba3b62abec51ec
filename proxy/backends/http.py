"""A remote model behind an Open Inference Protocol (KServe V2) REST server.

Triton, KServe, MLServer, or another mirrorgate. One pooled ``aiohttp.ClientSession`` per
backend (keep-alive connections are reused across calls) and a per-call deadline of
``settings.timeout_ms`` covering connect, send and the whole response read.

Two ways to call it:

* :meth:`HttpBackend.forward` sends a client's request as it came (pass-through, the
  live path in front of a remote champion: docs/proxy.md) and returns the status,
  end-to-end headers and body bytes unchanged, compressed or not.
* :meth:`HttpBackend.infer` rebuilds a request from tensors (the candidate, a canary
  champion), in an encoding the upstream accepts: the binary tensor extension when its
  server metadata (``GET /v2``) lists ``binary_tensor_data``, JSON otherwise (MLServer);
  ``upstream.binary: always|never`` overrides.

A pooled keep-alive connection the upstream closed while idle fails the next request
before any response byte arrives; such a request is retried once on a fresh
connection (nothing reached the server's application, so the retry cannot run a
model twice). Any other failure is not retried.

Faults are converted where they enter: a deadline miss is :class:`BackendTimeout` (504),
an upstream error status on a rebuilt call carries the upstream's own message in a
:class:`BackendError` (an upstream 400 keeps status 400: the request, not the model, was
at fault), and a malformed reply or a dropped connection is a :class:`BackendError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from proxy.core import context
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BackendTimeout, ConfigError, MirrorgateError
from proxy.core.inflate import GZIP_WBITS, TooLarge, inflate
from proxy.protocol.base import ModelIdentity, ModelMetadata
from proxy.protocol.codec import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    metadata_from_dict,
)
from proxy.protocol.headers import Headers, end_to_end

# Responses larger than this are decoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 1 << 20
# Metadata is fetched once at start; allow a cold upstream more than one call's deadline.
MIN_METADATA_TIMEOUT_S = 5.0
# The most an upstream's compressed answer may decode to (metadata, a pair's answer): far
# above any tensor answer the data plane serves, low enough that a bomb is refused.
MAX_DECODED_ANSWER = 256 * 1024 * 1024
BINARY_EXTENSION = "binary_tensor_data"
# What a reused connection closed by the peer looks like before any response byte.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def upstream_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        text = doc["error"]
    return f"{status} {text[:500]}" if text else str(status)


def decompress(body: bytes, encoding: str | None, limit: int = MAX_DECODED_ANSWER) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate (zlib-wrapped or raw) of an
    upstream's answer, never past ``limit`` decoded bytes: a misbehaving upstream's
    bomb is a BackendError (the pair or the call fails), not a worker out of memory."""
    name = (encoding or "identity").strip().lower()
    try:
        if name in ("", "identity"):
            return body
        if name in ("gzip", "x-gzip"):
            return inflate(body, GZIP_WBITS, limit)
        if name == "deflate":
            try:  # zlib-wrapped (RFC 1950) as specified, else raw (RFC 1951)
                return inflate(body, zlib.MAX_WBITS, limit)
            except zlib.error:
                return inflate(body, -zlib.MAX_WBITS, limit)
    except TooLarge as exc:
        raise BackendError(
            f"a {name} answer decompresses past {limit} bytes (the limit on decoded answers)"
        ) from exc
    except zlib.error as exc:
        raise BackendError(f"cannot decompress a {name} body: {exc}") from exc
    raise BackendError(f"unsupported content encoding {name!r}")


def ssl_context(settings: BackendSettings) -> ssl.SSLContext | None:
    """The TLS context for an https upstream: the configured CA (else the system's) and
    the optional client certificate (mTLS)."""
    up = settings.upstream
    if not (settings.url or "").lower().startswith("https") and not up.ca_file:
        return None
    try:
        ctx = ssl.create_default_context(cafile=up.ca_file)
        if up.cert_file:
            ctx.load_cert_chain(up.cert_file, up.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"models.{settings.name}.upstream: TLS files: {exc}") from exc
    return ctx


@dataclass(frozen=True, slots=True)
class Reply:
    """An upstream's answer as it came: status, end-to-end headers, body bytes."""

    status: int
    reason: str | None
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


async def _on_reuse(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    flags = ctx.trace_request_ctx
    if isinstance(flags, dict):
        flags["reused"] = True


def _trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace


class HttpBackend:
    """Backend calling ``POST {url}/v2/models/{model}/infer`` on an upstream V2 server."""

    def __init__(
        self,
        settings: BackendSettings,
        session: aiohttp.ClientSession,
        metadata: ModelMetadata,
        extensions: tuple[str, ...] = (),
    ) -> None:
        self._settings = settings
        self._session = session
        self._fresh: aiohttp.ClientSession | None = None
        self._metadata = metadata
        self.model = settings.model or settings.name
        self.base_url = (settings.url or "").rstrip("/")
        self._infer_url = f"{self.base_url}/v2/models/{quote(self.model, safe='')}/infer"
        self._timeout_s = settings.timeout_ms / 1000.0
        self.extensions = extensions
        mode = settings.upstream.binary
        self.binary = mode == "always" or (mode == "auto" and BINARY_EXTENSION in extensions)
        digest = hashlib.sha256(f"{self.base_url}|{self.model}".encode()).hexdigest()
        self._identity = ModelIdentity(
            name=settings.name,
            kind="http",
            digest=digest,
            device="remote",
            extra={"url": self.base_url, "model": self.model},
        )

    @classmethod
    async def create(cls, settings: BackendSettings) -> HttpBackend:
        if not settings.url:
            raise BackendError(f"backend {settings.name!r}: an http backend needs 'url'")
        session = cls._new_session(settings)
        try:
            extensions = await cls._fetch_extensions(session, settings)
            metadata = await cls._fetch_metadata(session, settings)
        except BaseException:
            await session.close()
            raise
        return cls(settings, session, metadata, extensions)

    @staticmethod
    def _new_session(
        settings: BackendSettings, *, force_close: bool = False
    ) -> aiohttp.ClientSession:
        ctx = ssl_context(settings)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256,
                ttl_dns_cache=300,
                ssl=ctx if ctx is not None else True,
                force_close=force_close,
            ),
            # Deadlines are per call (asyncio.timeout); no session-wide total.
            timeout=aiohttp.ClientTimeout(total=None),
            # Pass-through hands the upstream's body on as it came (compressed or not);
            # no header the client did not send is added to a forwarded request.
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            trace_configs=[_trace()],
        )

    @staticmethod
    async def _get_json(
        session: aiohttp.ClientSession, settings: BackendSettings, path: str, what: str
    ) -> tuple[int, Any]:
        base = (settings.url or "").rstrip("/")
        timeout = max(settings.timeout_ms / 1000.0, MIN_METADATA_TIMEOUT_S)
        try:
            async with asyncio.timeout(timeout):
                async with session.get(
                    base + path, headers={"Accept-Encoding": "identity"}
                ) as resp:
                    body = decompress(await resp.read(), resp.headers.get("Content-Encoding"))
                    status = resp.status
        except TimeoutError as exc:
            raise BackendTimeout(f"upstream {base}: {what} timed out") from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"upstream {base} is unreachable: {exc}") from exc
        if status != 200:
            return status, body
        try:
            return status, json.loads(body)
        except ValueError as exc:
            raise BackendError(f"upstream {base}: {what} is not JSON") from exc

    @classmethod
    async def _fetch_extensions(
        cls, session: aiohttp.ClientSession, settings: BackendSettings
    ) -> tuple[str, ...]:
        status, doc = await cls._get_json(session, settings, "/v2", "server metadata")
        if status != 200 or not isinstance(doc, dict):
            return ()  # no server metadata: assume no extension (JSON is always accepted)
        raw = doc.get("extensions") or []
        return tuple(str(e) for e in raw) if isinstance(raw, list) else ()

    @classmethod
    async def _fetch_metadata(
        cls, session: aiohttp.ClientSession, settings: BackendSettings
    ) -> ModelMetadata:
        base = (settings.url or "").rstrip("/")
        model = settings.model or settings.name
        what = f"metadata of {model!r}"
        status, doc = await cls._get_json(
            session, settings, f"/v2/models/{quote(model, safe='')}", what
        )
        if status != 200:
            raise BackendError(f"upstream {base}: {what} failed: {upstream_message(status, doc)}")
        return metadata_from_dict(doc)

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def settings(self) -> BackendSettings:
        return self._settings

    # ----------------------------------------------------------------- transport

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: list[tuple[str, str]],
        timeout_s: float,
    ) -> Reply:
        """One request with its deadline; retried once on a fresh connection when a
        reused keep-alive connection turns out closed before any response byte."""
        try:
            async with asyncio.timeout(timeout_s):
                flags: dict[str, bool] = {}
                try:
                    return await self._exchange(self._session, method, url, body, headers, flags)
                except _STALE:
                    if not flags.get("reused"):
                        raise
                if self._fresh is None:
                    self._fresh = self._new_session(self._settings, force_close=True)
                return await self._exchange(self._fresh, method, url, body, headers, {})
        except TimeoutError as exc:
            raise BackendTimeout(
                f"upstream {self.base_url} timed out after {timeout_s * 1000:g} ms"
            ) from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"upstream {self.base_url} connection failed: {exc!r}") from exc

    @staticmethod
    async def _exchange(
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        body: bytes | None,
        headers: list[tuple[str, str]],
        flags: dict[str, bool],
    ) -> Reply:
        async with session.request(
            method, url, data=body, headers=headers, trace_request_ctx=flags
        ) as resp:
            headers_in = list(resp.headers.items())
            # Past the status line: a failure from here on is not retried.
            flags["answered"] = True
            try:
                payload = await resp.read()
            except _STALE as exc:
                raise aiohttp.ClientPayloadError(f"connection lost mid-response: {exc}") from exc
            return Reply(
                resp.status,
                resp.reason,
                end_to_end(headers_in, resp.headers.get("Connection")),
                payload,
            )

    async def forward(
        self,
        method: str,
        path_qs: str,
        body: bytes | None,
        headers: Headers,
        *,
        timeout_s: float | None = None,
    ) -> Reply:
        """Send a client's request on as it came (pass-through); path is ``/v2/...``."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        return await self._send(method, self.base_url + path_qs, body, list(headers), timeout)

    # ----------------------------------------------------------------- rebuilt calls

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        body, headers = self.infer_request(inputs, outputs)
        reply = await self._send("POST", self._infer_url, body, headers, self._timeout_s)
        return await self.infer_result(reply, outputs)

    # The two halves of :meth:`infer` around the transport, so that another transport
    # (the shadow worker's raw client, proxy/shadow/candidate_client.py) makes the same
    # request and reads the reply by the same rules.

    @property
    def infer_url(self) -> str:
        return self._infer_url

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def infer_request(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """The body and headers of a rebuilt infer call (encoding per the upstream)."""
        rid = context.request_id.get()
        binary = self.binary
        body, header_length = encode_infer_request(
            inputs, outputs=outputs, request_id=rid, binary=binary, binary_outputs=binary
        )
        headers = list(context.upstream_headers.get())
        headers.append(
            ("Content-Type", "application/octet-stream" if binary else "application/json")
        )
        if rid is not None:
            headers.append(("X-Request-Id", rid))
        if header_length is not None:
            headers.append((HEADER_LENGTH, str(header_length)))
        return body, headers

    async def infer_result(self, reply: Reply, outputs: list[str] | None) -> dict[str, np.ndarray]:
        """The outputs of a rebuilt call's reply; the upstream's failures as errors."""
        if reply.status != 200:
            message = (
                f"upstream {self.model!r} answered {upstream_message(reply.status, reply.body)}"
            )
            raise BackendError(message, status=400 if reply.status == 400 else 502)
        payload = decompress(reply.body, reply.header("Content-Encoding"))
        reply_length = reply.header(HEADER_LENGTH)
        try:
            if len(payload) > OFFLOAD_BYTES:
                response = await asyncio.to_thread(decode_infer_response, payload, reply_length)
            else:
                response = decode_infer_response(payload, reply_length)
        except MirrorgateError as exc:
            raise BackendError(f"upstream {self.model!r}: {exc.message}") from exc
        result: dict[str, Any] = response.outputs
        if outputs is not None:
            missing = [n for n in outputs if n not in result]
            if missing:
                raise BackendError(
                    f"upstream {self.model!r} did not return output(s) {', '.join(missing)}"
                )
        return result

    async def aclose(self) -> None:
        await self._session.close()
        if self._fresh is not None:
            await self._fresh.close()
