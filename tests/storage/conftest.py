"""Fixtures: every database test runs on SQLite and on a real PostgreSQL server.

PostgreSQL is a throwaway cluster started once per session (tests/support/postgres.py).
Without PostgreSQL binaries the PostgreSQL half is skipped with the reason, except when
``MIRRORGATE_REQUIRE_SERVICES=1`` (CI): then it fails.

``db`` gives a migrated, empty database: on SQLite a copy of a migrated template file,
on PostgreSQL one shared migrated database whose tables are emptied before each test
(both far cheaper than migrating per test). ``empty_url`` gives an unmigrated one.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import Database
from storage.entities import Rollout
from storage.migrate import upgrade
from storage.schema import Base
from storage.store import Store
from tests.storage.factories import CANDIDATE, CHAMPION
from tests.support.postgres import PostgresServer, PostgresUnavailable

REQUIRE = os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
        server.init()
        server.start()
    except PostgresUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"MIRRORGATE_REQUIRE_SERVICES=1 but PostgreSQL is unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable, PostgreSQL tests skipped: {exc}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_shared_url(pg_server: PostgresServer) -> str:
    url = pg_server.create_database("mg_shared")
    db = Database(url)
    upgrade(db)
    db.dispose()
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.sqlite"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database with nothing in it (migration tests)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite'}"
        return
    pg: PostgresServer = request.getfixturevalue("pg_server")
    name = f"mg_empty_{os.getpid()}_{next(_names)}"
    url = pg.create_database(name)
    try:
        yield url
    finally:
        pg.drop_database(name)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A migrated database with empty tables."""
    if backend == "sqlite":
        path = tmp_path / "test.sqlite"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_shared_url")
    db = Database(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    db.dispose()
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url, busy_timeout_ms=200)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def store(db: Database) -> Store:
    return Store(db)


@pytest.fixture
def rollout(store: Store) -> Rollout:
    return store.create_rollout(
        CHAMPION, CANDIDATE, rollout_id="r-test", config_digest="cfg", task="classifier"
    )
