"""Schema migrations (Alembic, shipped in ``storage/migrations``) and the start-up check.

The script location comes from this package, never from a working-directory
``alembic.ini``, so ``mirrorgate db upgrade`` works from anywhere and in a wheel.

``open_database(settings)`` is what the server calls at start: with
``storage.migrate: upgrade`` (the default) a behind schema is upgraded — on PostgreSQL
under an advisory lock, so several replicas starting together upgrade once; with
``refuse`` it raises :class:`SchemaError` telling the operator to run
``mirrorgate db upgrade``. A database *ahead* of this code (a newer mirrorgate migrated
it) or one holding foreign tables without Alembic's version row is always refused:
guessing there could corrupt data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from storage.db import Database
from storage.errors import SchemaError, StorageError
from storage.schema import Base
from storage.settings import StorageSettings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: "mirrorgate" folded into a signed 64-bit integer.
_LOCK_KEY = int.from_bytes(b"mirrgate", "big") & 0x7FFF_FFFF_FFFF_FFFF

SchemaState = Literal["current", "behind", "empty", "ahead", "unversioned"]


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    state: SchemaState
    current: str | None
    head: str

    @property
    def message(self) -> str:
        return {
            "current": f"schema is current (revision {self.head})",
            "behind": f"schema is at revision {self.current}, this mirrorgate needs {self.head}",
            "empty": f"database is empty, this mirrorgate needs revision {self.head}",
            "ahead": f"schema is at revision {self.current}, unknown to this mirrorgate "
            f"(its newest is {self.head}): a newer mirrorgate migrated this database",
            "unversioned": "database has tables but no mirrorgate schema version: "
            "not a mirrorgate database, or created without migrations",
        }[self.state]


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SchemaError("no migrations are shipped with this mirrorgate")
    return head


def _status(conn: Connection) -> SchemaStatus:
    script = ScriptDirectory.from_config(alembic_config())
    head = head_revision()
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        ours = set(Base.metadata.tables)
        present = set(inspect(conn).get_table_names()) & ours
        return SchemaStatus("unversioned" if present else "empty", None, head)
    if current == head:
        return SchemaStatus("current", current, head)
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        return SchemaStatus("ahead", current, head)
    return SchemaStatus("behind", current, head)


def schema_status(db: Database) -> SchemaStatus:
    try:
        with db.engine.connect() as conn:
            return _status(conn)
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema of {db.display_url}: {exc}") from exc


def _locked_status(db: Database) -> SchemaStatus:
    try:
        with db.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            return _status(conn)
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema of {db.display_url}: {exc}") from exc


def upgrade(db: Database, revision: str = "head") -> SchemaStatus:
    """Upgrade the schema to ``revision``; returns the status after.

    Runs in one transaction (PostgreSQL's DDL is transactional, so a failed upgrade
    leaves the old schema intact), under an advisory lock on PostgreSQL.
    """
    try:
        with db.engine.begin() as conn:
            if db.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            before = _status(conn)
            if before.state in ("ahead", "unversioned"):
                raise SchemaError(f"{db.display_url}: {before.message}; not upgrading")
            if before.state != "current" or revision != "head":
                log.info("upgrading %s: %s", db.display_url, before.message)
                command.upgrade(alembic_config(conn), revision)
            return _status(conn)
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot upgrade {db.display_url}: {exc}") from exc


def ensure_schema(db: Database, mode: Literal["upgrade", "refuse"]) -> SchemaStatus:
    """The start-up check: upgrade a behind schema, or refuse with a clear message."""
    status = schema_status(db)
    if status.state == "unversioned" and db.dialect == "postgresql":
        # Two reads (version, then tables): a replica upgrading concurrently can commit
        # between them. Read again under the upgrade lock, where the state is settled.
        status = _locked_status(db)
    if status.state == "current":
        return status
    if status.state in ("ahead", "unversioned"):
        raise SchemaError(f"{db.display_url}: {status.message}; refusing to start")
    if mode == "refuse":
        raise SchemaError(
            f"{db.display_url}: {status.message}; run `mirrorgate db upgrade` "
            "(or set storage.migrate: upgrade) and start again"
        )
    return upgrade(db)


def open_database(settings: StorageSettings) -> Database:
    """Open ``settings.url`` and make its schema current per ``settings.migrate``."""
    db = Database(settings.url, sqlite_journal=settings.sqlite_journal)
    try:
        ensure_schema(db, settings.migrate)
    except BaseException:
        db.dispose()
        raise
    return db
