"""Fixtures of the several-replicas tests: one real PostgreSQL cluster for the session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, PostgresUnavailable

REQUIRE = os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
        server.init()
        server.start()
    except PostgresUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"MIRRORGATE_REQUIRE_SERVICES=1 but PostgreSQL is unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable, replica tests skipped: {exc}")
    try:
        yield server
    finally:
        server.destroy()
