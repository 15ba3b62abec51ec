"""Bearer-token checks for the control plane (``/v1/...``), constant-time.

Two scopes (docs/deploy.md): ``read`` (verdict, rollout state, rollouts list, pinned
list) and ``write`` (start/close rollouts, promote/abort/pause/resume, labels, triage).
``control.write_token`` grants both; ``control.read_token`` only reading;
``server.control_token`` (the single-token setup) grants both.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from pydantic import SecretStr

from proxy.core.errors import Unauthorized

if TYPE_CHECKING:
    from proxy.core.config import MirrorgateConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Scope = Literal["read", "write"]
# RFC 6750 section 3: a token was given and is wrong (a missing one gets the bare challenge)
INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="mirrorgate", error="invalid_token"'}


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
            headers=INVALID_TOKEN,
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


def _secret(token: SecretStr | None) -> bytes | None:
    return None if token is None else token.get_secret_value().encode()


def scope_tokens(config: MirrorgateConfig, scope: Scope) -> list[bytes]:
    """The tokens that grant ``scope`` (write implies read)."""
    control = config.control
    tokens = [config.server.control_token, control.write_token]
    if scope == "read":
        tokens.append(control.read_token)
    return [t for t in (_secret(x) for x in tokens) if t]


def check_scope(config: MirrorgateConfig, scope: Scope, given: str | None) -> None:
    """Raise Unauthorized unless ``given`` is a token granting ``scope``.

    Every configured token is compared (constant time each), so the answer's timing does
    not tell which one nearly matched.
    """
    tokens = scope_tokens(config, scope)
    if not tokens:
        raise Unauthorized(
            "the control plane is disabled: set control.read_token / control.write_token "
            "(or server.control_token)"
        )
    if not given:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    try:
        raw = given.strip().encode("ascii")
    except UnicodeEncodeError:
        raise Unauthorized("invalid bearer token", headers=INVALID_TOKEN) from None
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(raw, token)
    if not matched:
        if scope == "write" and any(
            hmac.compare_digest(raw, t) for t in scope_tokens(config, "read")
        ):
            raise Unauthorized(
                "this token may only read: the action needs the write token", status=403
            )
        raise Unauthorized("invalid bearer token", headers=INVALID_TOKEN)


def bearer_of(request: web.Request) -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    return given
