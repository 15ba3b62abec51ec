"""Opening a database: SQLite by file path (WAL) or PostgreSQL by URL, one code path.

``Database`` owns the SQLAlchemy engine. SQLite gets a rollback journal in
``TRUNCATE`` mode by default (``storage.sqlite_journal``), ``synchronous=NORMAL``,
foreign keys and a busy timeout. Not WAL by default: WAL's index lives in the ``-shm``
file, which SQLite maps into memory, and when that file is truncated, cannot be
extended (disk full) or is swapped under the process, touching the mapping raises
SIGBUS, which kills the whole proxy, live path included (an unwritable ``-shm`` did
exactly that in the fault probes). A rollback journal uses plain reads and writes, so
the same faults are I/O errors the recorder counts as drops. The cost: a reader waits
(``busy_timeout``) while a batch commits; the recorder writes large batches, so the
waits are short (docs/faults.md has the measured throughput of both). ``wal`` stays
available for a database on a disk the operator trusts.

PostgreSQL gets pre-ping, so connections killed by a server restart are replaced
instead of failing the next write.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from storage.errors import StorageError

# SQLite's page cache, per connection (``PRAGMA cache_size``, KiB). Each pooled
# connection keeps its own, filled with every page it touches, so a growing database
# grows the process by (connections in the pool) x (this bound): at 32 MB it was the
# whole of the 200k-request soak's memory growth (docs/faults.md, "Soak"). 2 MiB is
# SQLite's own default; the recorder appends, so its hot pages are few.
SQLITE_CACHE_KIB = 2000

_PG_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg"}


def normalize_url(url: str) -> URL:
    """Parse a storage URL; ``postgresql://`` and ``postgres://`` mean psycopg 3."""
    raw = url.strip()
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise StorageError(f"storage.url {url!r} is not a database URL") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in _PG_SCHEMES and parsed.get_backend_name() != "sqlite":
        raise StorageError(
            f"storage.url {url!r}: only sqlite:///PATH and postgresql+psycopg://... are supported"
        )
    return parsed


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


class Database:
    """An engine plus what the rest of ``storage`` needs to know about its dialect."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 5000,
        echo: bool = False,
        sqlite_journal: str = "truncate",
    ) -> None:
        self.url = normalize_url(url)
        self.engine = _make_engine(
            self.url, busy_timeout_ms=busy_timeout_ms, echo=echo, journal=sqlite_journal
        )

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        """The URL with its password masked, for logs and messages."""
        return self.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"


def _make_engine(url: URL, *, busy_timeout_ms: int, echo: bool, journal: str) -> Engine:
    kwargs: dict[str, Any] = {"echo": echo}
    if url.get_backend_name() == "sqlite":
        memory = is_memory_sqlite(url)
        kwargs["connect_args"] = {"check_same_thread": False}
        if memory:
            # One shared connection: every thread must see the same in-memory database.
            kwargs["poolclass"] = StaticPool
        elif url.database:
            folder = os.path.dirname(os.path.abspath(url.database))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the folder of {url.database}: {exc}") from exc
        engine = create_engine(url, **kwargs)
        _sqlite_pragmas(
            engine, journal=None if memory else journal, busy_timeout_ms=busy_timeout_ms
        )
        return engine
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5
    try:
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args=connect_args,
            pool_size=5,
            max_overflow=5,
            **kwargs,
        )
    except ModuleNotFoundError as exc:
        # The driver is an extra: the core install is SQLite only.
        raise StorageError(
            f"{url.get_backend_name()} needs the {exc.name} driver, which is not installed: "
            "pip install 'mirrorgate[postgres]'"
        ) from exc


def _sqlite_pragmas(engine: Engine, *, journal: str | None, busy_timeout_ms: int) -> None:
    if journal is not None and journal not in ("wal", "truncate"):
        raise StorageError(f"storage.sqlite_journal must be wal or truncate, not {journal!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if journal is not None:
                # The busy timeout first: leaving WAL needs a moment of exclusive access.
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                cur.execute(f"PRAGMA journal_mode={journal.upper()}")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        finally:
            cur.close()
