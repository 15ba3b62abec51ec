"""A remote model behind an Open Inference Protocol (KServe V2) REST server.

Triton, KServe, MLServer, or another mirrorgate. One pooled ``aiohttp.ClientSession`` per
backend (keep-alive connections are reused across calls), binary tensor transport both
ways (the cheapest encoding every V2 server of note understands), and a per-call
deadline of ``settings.timeout_ms`` covering connect, send and the whole response read.

Faults are converted where they enter: a deadline miss is :class:`BackendTimeout` (504),
an upstream error status carries the upstream's own ``{"error": ...}`` message in a
:class:`BackendError` (an upstream 400 keeps status 400: the request, not the model, was
at fault), and a malformed reply or a dropped connection is a :class:`BackendError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from proxy import context
from proxy.backends.base import ModelIdentity, ModelMetadata
from proxy.codec import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    metadata_from_dict,
)
from proxy.config import BackendSettings
from proxy.errors import BackendError, BackendTimeout, MirrorgateError

# Responses larger than this are decoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 1 << 20
# Metadata is fetched once at start; allow a cold upstream more than one call's deadline.
MIN_METADATA_TIMEOUT_S = 5.0


def _upstream_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        text = doc["error"]
    return f"{status} {text[:500]}" if text else str(status)


class HttpBackend:
    """Backend calling ``POST {url}/v2/models/{model}/infer`` on an upstream V2 server."""

    def __init__(
        self,
        settings: BackendSettings,
        session: aiohttp.ClientSession,
        metadata: ModelMetadata,
    ) -> None:
        self._settings = settings
        self._session = session
        self._metadata = metadata
        self.model = settings.model or settings.name
        self.base_url = (settings.url or "").rstrip("/")
        self._infer_url = f"{self.base_url}/v2/models/{quote(self.model, safe='')}/infer"
        self._timeout_s = settings.timeout_ms / 1000.0
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
        session = cls._new_session()
        try:
            metadata = await cls._fetch_metadata(session, settings)
        except BaseException:
            await session.close()
            raise
        return cls(settings, session, metadata)

    @staticmethod
    def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
            # Deadlines are per call (asyncio.timeout); no session-wide total.
            timeout=aiohttp.ClientTimeout(total=None),
            # Compressing loopback/cluster traffic costs CPU on both ends and saves little.
            skip_auto_headers=("Accept-Encoding",),
        )

    @staticmethod
    async def _fetch_metadata(
        session: aiohttp.ClientSession, settings: BackendSettings
    ) -> ModelMetadata:
        base = (settings.url or "").rstrip("/")
        model = settings.model or settings.name
        url = f"{base}/v2/models/{quote(model, safe='')}"
        timeout = max(settings.timeout_ms / 1000.0, MIN_METADATA_TIMEOUT_S)
        try:
            async with asyncio.timeout(timeout):
                async with session.get(url) as resp:
                    body = await resp.read()
                    status = resp.status
        except TimeoutError as exc:
            raise BackendTimeout(f"upstream {base}: metadata of {model!r} timed out") from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"upstream {base} is unreachable: {exc}") from exc
        if status != 200:
            raise BackendError(
                f"upstream {base}: metadata of {model!r} failed: {_upstream_message(status, body)}"
            )
        try:
            return metadata_from_dict(json.loads(body))
        except ValueError as exc:
            raise BackendError(f"upstream {base}: metadata of {model!r} is not JSON") from exc

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        rid = context.request_id.get()
        body, header_length = encode_infer_request(inputs, outputs=outputs, request_id=rid)
        headers = {"Content-Type": "application/octet-stream"}
        if rid is not None:
            headers["X-Request-Id"] = rid
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(self._infer_url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    status = resp.status
                    reply_length = resp.headers.get(HEADER_LENGTH)
        except TimeoutError as exc:
            raise BackendTimeout(
                f"upstream {self.model!r} timed out after {self._settings.timeout_ms:g} ms"
            ) from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"upstream {self.model!r} connection failed: {exc!r}") from exc
        if status != 200:
            message = f"upstream {self.model!r} answered {_upstream_message(status, payload)}"
            raise BackendError(message, status=400 if status == 400 else 502)
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
