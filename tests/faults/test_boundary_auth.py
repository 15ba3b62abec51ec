"""Hostile bytes at the control plane: 401s say how to authenticate, bytes that are not
UTF-8 are a 401 (never a 500, never a log line), path parameters are validated.

Real proxy app on loopback (aiohttp's test server), raw sockets where the client
library would refuse to send the bytes; storage on a real SQLite file where a route
needs it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.faults.helpers import AUTH, TOKEN
from tests.proxy.conftest import LIVE_PATHS, make_config


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    """Every test here holds on both live paths (``server.live_path``)."""
    return str(request.param)


async def _raw(proxy: Any, head: bytes) -> bytes:
    server = proxy.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 30)
    finally:
        writer.close()


async def _proxy(start_upstream: Any, start_proxy: Any, tmp_path: Path | None = None) -> Any:
    champion = await start_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    sections: dict[str, Any] = {"server": {"control_token": TOKEN}}
    if tmp_path is not None:
        sections["storage"] = {"url": f"sqlite:///{tmp_path / 'mg.sqlite'}"}
    config = make_config(champion.url, candidate.url, **sections)
    return await start_proxy(config, storage=tmp_path is not None)


async def test_401_carries_www_authenticate(start_upstream: Any, start_proxy: Any) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    missing = await proxy.client.get("/v1/rollout")
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="mirrorgate"'
    wrong = await proxy.client.get("/v1/rollout", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert (await wrong.json())["error"]


async def test_non_utf8_token_is_a_401_and_forges_no_log_line(
    start_upstream: Any, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await _proxy(start_upstream, start_proxy)
    caplog.set_level(logging.DEBUG)
    answer = await _raw(
        proxy,
        b"GET /v1/rollout%0d%0a2026-12-06%20FORGED%20CRITICAL%20admin HTTP/1.1\r\n"
        b"Host: x\r\nAuthorization: Bearer \xff\xfe\x80forged\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 40"), answer[:200]
    assert b"500" not in answer.split(b"\r\n", 1)[0]
    ok = await _raw(
        proxy,
        b"GET /v1/rollout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 401"), ok[:200]
    assert b"WWW-Authenticate: Bearer" in ok
    # The path may be logged (access log), but escaped: never a line of its own.
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "\n2026-12-06 FORGED" in m or "\r" in m]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # and the right token still works
    assert (await proxy.client.get("/v1/rollout", headers=AUTH)).status == 200


@pytest.mark.parametrize("raw", ["9" * 30, "-1", "1e3", "\u0661\u0662", "0x10", " 7"])
async def test_pinned_id_that_names_no_case_is_404(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, raw: str
) -> None:
    proxy = await _proxy(start_upstream, start_proxy, tmp_path)
    resp = await proxy.client.get(f"/v1/pinned/{raw}", headers=AUTH)
    assert resp.status == 404, await resp.text()
    assert "no pinned case" in (await resp.json())["error"]
    resp = await proxy.client.post(
        f"/v1/pinned/{raw}", headers=AUTH, json={"status": "pinned", "who": "a", "why": "b"}
    )
    assert resp.status == 404, await resp.text()
