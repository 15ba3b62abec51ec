import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from proxy.cli.main import main
from storage.db import Database
from storage.errors import SchemaError
from storage.migrate import ensure_schema, head_revision, open_database, schema_status, upgrade
from storage.schema import Base
from storage.settings import StorageSettings

ROOT = Path(__file__).resolve().parents[2]


def test_upgrade_from_empty_creates_every_table(empty_url):
    db = Database(empty_url)
    try:
        assert schema_status(db).state == "empty"
        after = upgrade(db)
        assert after.state == "current" and after.current == head_revision()
        tables = set(inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert upgrade(db).state == "current"  # idempotent
    finally:
        db.dispose()


def test_migrations_match_models(empty_url):
    db = Database(empty_url)
    try:
        upgrade(db)
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], "schema.py changed without a migration: " + repr(diff)
    finally:
        db.dispose()


def test_start_refuses_a_behind_schema_when_told_to(empty_url):
    settings = StorageSettings(url=empty_url, migrate="refuse")
    with pytest.raises(SchemaError, match="run `mirrorgate db upgrade`"):
        open_database(settings)
    db = open_database(StorageSettings(url=empty_url))  # default: upgrade
    try:
        assert schema_status(db).state == "current"
        assert ensure_schema(db, "refuse").state == "current"
    finally:
        db.dispose()


def test_start_refuses_a_newer_or_foreign_schema(empty_url):
    db = Database(empty_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE pairs (id INTEGER PRIMARY KEY)"))
        assert schema_status(db).state == "unversioned"
        with pytest.raises(SchemaError, match="no mirrorgate schema version"):
            ensure_schema(db, "upgrade")
        with db.engine.begin() as conn:
            conn.execute(text("DROP TABLE pairs"))
        upgrade(db)
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        assert schema_status(db).state == "ahead"
        with pytest.raises(SchemaError, match="newer mirrorgate"):
            ensure_schema(db, "upgrade")
        with pytest.raises(SchemaError, match="not upgrading"):
            upgrade(db)
    finally:
        db.dispose()


def test_db_upgrade_cli(empty_url, capsys):
    assert main(["db", "status", "--url", empty_url]) == 1
    assert "empty" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", empty_url]) == 0
    assert "current" in capsys.readouterr().out
    assert main(["db", "status", "--url", empty_url]) == 0


def test_db_upgrade_cli_reads_the_config(tmp_path, capsys):
    db_path = tmp_path / "from-config.sqlite"
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(
        "models:\n  champion: {name: c, kind: http, url: 'http://127.0.0.1:1'}\n"
        f"storage:\n  url: sqlite:///{db_path}\n"
    )
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert db_path.exists()


def test_db_cli_bad_url_is_exit_2(capsys):
    assert main(["db", "upgrade", "--url", "mysql://nope"]) == 2
    assert "only sqlite" in capsys.readouterr().err


def test_console_script_from_another_directory(tmp_path):
    """The migrations are found from the package, not from the working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "db", "upgrade", "--url", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "current" in done.stdout


def test_downgrade_to_base_and_back(empty_url):
    from alembic import command

    from storage.migrate import alembic_config

    db = Database(empty_url)
    try:
        upgrade(db)
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        assert upgrade(db).state == "current"
    finally:
        db.dispose()
