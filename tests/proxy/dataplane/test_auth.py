"""bearer_auth on a real route: the control plane's guard."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from proxy.dataplane.auth import bearer_auth
from proxy.dataplane.v2 import error_middleware


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.mark.parametrize(
    ("token", "header", "status", "message"),
    [
        (SecretStr("s3cret"), "Bearer s3cret", 200, None),
        (SecretStr("s3cret"), "bearer s3cret", 200, None),
        (SecretStr("s3cret"), "Bearer wrong", 401, "invalid bearer token"),
        (SecretStr("s3cret"), "Basic czNjcmV0", 401, "missing bearer token"),
        (SecretStr("s3cret"), None, 401, "missing bearer token"),
        (None, "Bearer anything", 401, "control plane is disabled"),
    ],
)
async def test_bearer_auth(
    aiohttp_client: Any, token: SecretStr | None, header: str | None, status: int, message: str
) -> None:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/rollout/promote", bearer_auth(token)(_ok))
    client = await aiohttp_client(app)
    headers = {"Authorization": header} if header else {}
    resp = await client.post("/v1/rollout/promote", headers=headers)
    assert resp.status == status
    body = await resp.json()
    if message:
        assert message in body["error"]
    else:
        assert body == {"ok": True}
