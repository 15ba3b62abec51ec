"""``mirrorgate serve`` records to storage, and refuses to start on one it cannot use.

A database it cannot open or a schema it must not upgrade is exit code 2 with the reason
on stderr (and a password in the URL never printed), before the port serves anything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.faults.helpers import own_upstream, spawn_serve
from tests.support.postgres import free_port


async def _serve_exit(storage: dict[str, Any], tmp_path: Path) -> tuple[int, str, str]:
    champion = await own_upstream(seed=1)
    try:
        config = {
            "server": {"model_name": "classifier"},
            "models": {
                "champion": {"name": "c", "kind": "http", "url": champion.url, "model": "model"}
            },
            "storage": storage,
        }
        proc = await spawn_serve(config, tmp_path)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()
    finally:
        await champion.close()


@pytest.mark.parametrize(
    ("storage", "needles"),
    [
        (
            {"url": "postgresql+psycopg://mg:hunter2@127.0.0.1:{port}/mg"},
            ["Connection refused", "***"],
        ),
        ({"url": "sqlite:///{tmp}/missing-dir/x/y.sqlite", "migrate": "refuse"}, ["storage"]),
        ({"url": "sqlite:///{tmp}/empty.sqlite", "migrate": "refuse"}, ["mirrorgate db upgrade"]),
    ],
    ids=["postgres-unreachable", "sqlite-unopenable", "schema-behind-refuse"],
)
async def test_unusable_storage_exits_2_with_the_reason(
    tmp_path: Path, storage: dict[str, str], needles: list[str]
) -> None:
    storage = {
        k: v.format(port=free_port(), tmp=tmp_path) if isinstance(v, str) else v
        for k, v in storage.items()
    }
    code, out, err = await _serve_exit(storage, tmp_path)
    assert code == 2, err[-3000:]
    assert "listening" not in out
    assert "mirrorgate: error: storage" in err
    for needle in needles:
        assert needle in err, err[-3000:]
    assert "hunter2" not in err and "Traceback" not in err
