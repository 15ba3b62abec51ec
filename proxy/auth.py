"""Bearer-token check for the control plane (``/v1/...``), constant-time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import wraps

from aiohttp import web
from pydantic import SecretStr

from proxy.errors import Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def check_bearer(request: web.Request, token: SecretStr | str | None) -> None:
    """Raise Unauthorized unless ``Authorization: Bearer <token>`` matches.

    With no token configured the control plane is closed rather than open: a proxy that
    can promote a model must never do so for an anonymous caller by default.
    """
    if token is None:
        raise Unauthorized("the control plane is disabled: set server.control_token")
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    # surrogateescape: header bytes that are not UTF-8 arrive as lone surrogates; they
    # must compare unequal (401), not raise (500).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given_bytes, secret.encode("utf-8")):
        raise Unauthorized(
            "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="mirrorgate", error="invalid_token"'},
        )


def bearer_auth(token: SecretStr | str | None) -> Callable[[Handler], Handler]:
    """Decorator: ``@bearer_auth(config.server.control_token)`` on a control handler."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            check_bearer(request, token)
            return await handler(request)

        return guarded

    return decorate
